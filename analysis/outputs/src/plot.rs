//! Figures with plotters: line charts (optionally with bands and log axes) and heat maps, laid
//! out as panels and written as SVG and PNG (each through a temporary file, then renamed).

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;

/// One line (with an optional band around it, e.g. ± std over seeds).
#[derive(Clone, Debug)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    /// (x, low, high) for a shaded band.
    pub band: Vec<(f64, f64, f64)>,
    pub dashed: bool,
}

impl Series {
    pub fn line(name: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Self { name: name.into(), points, band: Vec::new(), dashed: false }
    }

    pub fn dashed(mut self) -> Self {
        self.dashed = true;
        self
    }

    pub fn with_band(mut self, band: Vec<(f64, f64, f64)>) -> Self {
        self.band = band;
        self
    }
}

/// A panel: a line chart or a heat map.
#[derive(Clone, Debug)]
pub enum Panel {
    Lines(LineChart),
    Heat(HeatMap),
}

#[derive(Clone, Debug, Default)]
pub struct LineChart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub log_x: bool,
    pub log_y: bool,
    /// Fixed ranges (else from the data).
    pub x_range: Option<(f64, f64)>,
    pub y_range: Option<(f64, f64)>,
    pub series: Vec<Series>,
}

/// Values on a grid of (x, y) cells, coloured from `range.0` to `range.1` (values outside are
/// clamped, NaN drawn grey).
#[derive(Clone, Debug, Default)]
pub struct HeatMap {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub xs: Vec<f64>,
    pub ys: Vec<f64>,
    /// values[iy][ix].
    pub values: Vec<Vec<f64>>,
    pub range: (f64, f64),
}

/// Tableau's ten colours plus black and navy: a GPT-2 comparison has nine series, and a colour
/// must not repeat within one chart.
const COLORS: [RGBColor; 12] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(0, 0, 0),
    RGBColor(0, 0, 128),
];

/// The legend corner that covers the fewest data points: each candidate's box (the outer 35%
/// of the width and 40% of the height at that corner) is scored by the points inside it.
fn legend_position(c: &LineChart, (x0, x1): (f64, f64), (y0, y1): (f64, f64)) -> SeriesLabelPosition {
    let unit = |v: f64, lo: f64, hi: f64, log: bool| {
        if log {
            (v.ln() - lo.ln()) / (hi.ln() - lo.ln())
        } else {
            (v - lo) / (hi - lo)
        }
    };
    let pts: Vec<(f64, f64)> = c
        .series
        .iter()
        .flat_map(|s| s.points.iter())
        .filter(|p| p.0.is_finite() && p.1.is_finite())
        .map(|p| (unit(p.0, x0, x1, c.log_x), unit(p.1, y0, y1, c.log_y)))
        .collect();
    let covered = |right: bool, top: bool| {
        pts.iter()
            .filter(|(x, y)| (if right { *x >= 0.65 } else { *x <= 0.35 }) && (if top { *y >= 0.6 } else { *y <= 0.4 }))
            .count()
    };
    [
        (SeriesLabelPosition::UpperRight, covered(true, true)),
        (SeriesLabelPosition::LowerRight, covered(true, false)),
        (SeriesLabelPosition::UpperLeft, covered(false, true)),
        (SeriesLabelPosition::LowerLeft, covered(false, false)),
    ]
    .into_iter()
    .min_by_key(|(_, n)| *n)
    .map_or(SeriesLabelPosition::UpperRight, |(p, _)| p)
}

fn data_range(values: impl Iterator<Item = f64>, log: bool) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.filter(|v| v.is_finite() && (!log || *v > 0.0)) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return if log { (1e-3, 1.0) } else { (0.0, 1.0) };
    }
    if log {
        (lo / 1.5, hi * 1.5)
    } else if hi > lo {
        let pad = 0.05 * (hi - lo);
        (lo - pad, hi + pad)
    } else {
        (lo - 0.5, hi + 0.5)
    }
}

/// Tick labels: 2M, 500k, 0.25, 1e-5.
pub fn tick(v: f64) -> String {
    let a = v.abs();
    if a >= 1e6 && (a / 1e6).fract() == 0.0 {
        format!("{}M", v / 1e6)
    } else if a >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if a >= 1e4 {
        format!("{}k", (v / 1e3).round())
    } else if a == 0.0 || (1e-2..1e4).contains(&a) {
        let s = format!("{v:.3}");
        let s = s.trim_end_matches('0').trim_end_matches('.');
        if s == "-0" {
            "0".to_string()
        } else {
            s.to_string()
        }
    } else {
        format!("{v:.0e}")
    }
}

fn draw_lines<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, c: &LineChart) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let xs = c.series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
    let ys = c.series.iter().flat_map(|s| s.points.iter().map(|p| p.1).chain(s.band.iter().flat_map(|b| [b.1, b.2])));
    let (x0, x1) = c.x_range.unwrap_or_else(|| data_range(xs, c.log_x));
    let (y0, y1) = c.y_range.unwrap_or_else(|| data_range(ys, c.log_y));
    let mut builder = ChartBuilder::on(area);
    builder.caption(&c.title, ("sans-serif", 18)).margin(8).x_label_area_size(36).y_label_area_size(60);
    macro_rules! body {
        ($chart:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .x_desc(c.x_label.as_str())
                .y_desc(c.y_label.as_str())
                .x_label_formatter(&|v| tick(*v))
                .y_label_formatter(&|v| tick(*v))
                .draw()
                .map_err(|e| anyhow!("{e:?}"))?;
            for (k, s) in c.series.iter().enumerate() {
                let color = COLORS[k % COLORS.len()];
                if !s.band.is_empty() {
                    let mut poly: Vec<(f64, f64)> = s.band.iter().map(|b| (b.0, b.2)).collect();
                    poly.extend(s.band.iter().rev().map(|b| (b.0, b.1)));
                    chart
                        .draw_series(std::iter::once(Polygon::new(poly, color.mix(0.2).filled())))
                        .map_err(|e| anyhow!("{e:?}"))?;
                }
                let pts: Vec<(f64, f64)> =
                    s.points.iter().cloned().filter(|p| p.0.is_finite() && p.1.is_finite()).collect();
                let style = ShapeStyle { color: color.to_rgba(), filled: false, stroke_width: 2 };
                if s.dashed {
                    chart
                        .draw_series(DashedLineSeries::new(pts, 6, 4, style))
                        .map_err(|e| anyhow!("{e:?}"))?
                        .label(s.name.as_str())
                        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
                } else {
                    chart
                        .draw_series(LineSeries::new(pts, style))
                        .map_err(|e| anyhow!("{e:?}"))?
                        .label(s.name.as_str())
                        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
                }
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .position(legend_position(c, (x0, x1), (y0, y1)))
                .draw()
                .map_err(|e| anyhow!("{e:?}"))?;
        }};
    }
    match (c.log_x, c.log_y) {
        (false, false) => body!(builder.build_cartesian_2d(x0..x1, y0..y1).map_err(|e| anyhow!("{e:?}"))?),
        (true, false) => {
            body!(builder.build_cartesian_2d((x0..x1).log_scale(), y0..y1).map_err(|e| anyhow!("{e:?}"))?)
        }
        (false, true) => {
            body!(builder.build_cartesian_2d(x0..x1, (y0..y1).log_scale()).map_err(|e| anyhow!("{e:?}"))?)
        }
        (true, true) => body!(builder
            .build_cartesian_2d((x0..x1).log_scale(), (y0..y1).log_scale())
            .map_err(|e| anyhow!("{e:?}"))?),
    }
    Ok(())
}

/// Viridis-like ramp.
fn ramp(t: f64) -> RGBColor {
    let stops =
        [(68.0, 1.0, 84.0), (59.0, 82.0, 139.0), (33.0, 145.0, 140.0), (94.0, 201.0, 98.0), (253.0, 231.0, 37.0)];
    let t = t.clamp(0.0, 1.0) * (stops.len() - 1) as f64;
    let i = (t.floor() as usize).min(stops.len() - 2);
    let f = t - i as f64;
    let (a, b) = (stops[i], stops[i + 1]);
    let mix = |x: f64, y: f64| (x + (y - x) * f).round() as u8;
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

fn draw_heat<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, h: &HeatMap) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let (nx, ny) = (h.xs.len(), h.ys.len());
    let mut chart = ChartBuilder::on(area)
        .caption(&h.title, ("sans-serif", 18))
        .margin(8)
        .x_label_area_size(36)
        .y_label_area_size(60)
        // Cell i spans [i − ½, i + ½], so the integer ticks sit at the cell centres.
        .build_cartesian_2d(-0.5f64..nx as f64 - 0.5, -0.5f64..ny as f64 - 0.5)
        .map_err(|e| anyhow!("{e:?}"))?;
    let label = |vals: &[f64], v: f64| -> String {
        let i = v.round();
        if (v - i).abs() < 1e-6 && i >= 0.0 {
            vals.get(i as usize).map(|x| tick(*x)).unwrap_or_default()
        } else {
            String::new()
        }
    };
    let (xs, ys) = (h.xs.clone(), h.ys.clone());
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc(h.x_label.as_str())
        .y_desc(h.y_label.as_str())
        .x_labels(nx + 1)
        .y_labels(ny + 1)
        .x_label_formatter(&|v| label(&xs, *v))
        .y_label_formatter(&|v| label(&ys, *v))
        .draw()
        .map_err(|e| anyhow!("{e:?}"))?;
    let (lo, hi) = h.range;
    let cells = (0..ny).flat_map(|iy| (0..nx).map(move |ix| (ix, iy)));
    chart
        .draw_series(cells.map(|(ix, iy)| {
            let v = h.values.get(iy).and_then(|r| r.get(ix)).copied().unwrap_or(f64::NAN);
            let color = if v.is_finite() { ramp((v - lo) / (hi - lo).max(1e-300)) } else { RGBColor(160, 160, 160) };
            Rectangle::new([(ix as f64 - 0.5, iy as f64 - 0.5), (ix as f64 + 0.5, iy as f64 + 0.5)], color.filled())
        }))
        .map_err(|e| anyhow!("{e:?}"))?;
    // Cell values as text, so the figure can be read without a colour bar.
    chart
        .draw_series((0..ny).flat_map(|iy| (0..nx).map(move |ix| (ix, iy))).filter_map(|(ix, iy)| {
            let v = h.values.get(iy).and_then(|r| r.get(ix)).copied()?;
            if nx * ny > 400 {
                return None;
            }
            let t = if v.is_finite() { format!("{v:.3}") } else { "–".into() };
            Some(Text::new(t, (ix as f64 - 0.3, iy as f64 + 0.1), ("sans-serif", 12).into_font().color(&WHITE)))
        }))
        .map_err(|e| anyhow!("{e:?}"))?;
    Ok(())
}

fn draw_all<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, panels: &[Panel], cols: usize) -> Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE).map_err(|e| anyhow!("{e:?}"))?;
    let rows = panels.len().div_ceil(cols);
    let areas = root.split_evenly((rows, cols));
    for (area, panel) in areas.iter().zip(panels) {
        match panel {
            Panel::Lines(c) => draw_lines(area, c)?,
            Panel::Heat(h) => draw_heat(area, h)?,
        }
    }
    root.present().map_err(|e| anyhow!("{e:?}"))?;
    Ok(())
}

/// Write `stem.svg` and `stem.png` with the panels laid out in `cols` columns, each panel
/// `panel_size` pixels. Returns both paths.
pub fn save(stem: &Path, panels: &[Panel], cols: usize, panel_size: (u32, u32)) -> Result<[PathBuf; 2]> {
    let cols = cols.max(1).min(panels.len().max(1));
    let rows = panels.len().div_ceil(cols).max(1) as u32;
    let size = (panel_size.0 * cols as u32, panel_size.1 * rows);
    if let Some(dir) = stem.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let svg = stem.with_extension("svg");
    let png = stem.with_extension("png");
    let tmp = |p: &Path| {
        p.with_file_name(format!(
            ".{}.tmp.{}",
            p.file_name().unwrap().to_string_lossy(),
            p.extension().unwrap().to_string_lossy()
        ))
    };
    let (svg_tmp, png_tmp) = (tmp(&svg), tmp(&png));
    draw_all(SVGBackend::new(&svg_tmp, size).into_drawing_area(), panels, cols)
        .with_context(|| format!("drawing {}", svg.display()))?;
    draw_all(BitMapBackend::new(&png_tmp, size).into_drawing_area(), panels, cols)
        .with_context(|| format!("drawing {}", png.display()))?;
    std::fs::rename(&svg_tmp, &svg)?;
    std::fs::rename(&png_tmp, &png)?;
    Ok([svg, png])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_svg_and_png() {
        let dir = tempfile::tempdir().unwrap();
        let line = LineChart {
            title: "t".into(),
            x_label: "x".into(),
            y_label: "y".into(),
            log_y: true,
            series: vec![
                Series::line("a", (1..20).map(|i| (i as f64, 1.0 / i as f64)).collect())
                    .with_band((1..20).map(|i| (i as f64, 0.5 / i as f64, 2.0 / i as f64)).collect()),
                Series::line("b", (1..20).map(|i| (i as f64, 2.0 / i as f64)).collect()).dashed(),
            ],
            ..Default::default()
        };
        let heat = HeatMap {
            title: "h".into(),
            xs: vec![0.1, 0.5, 0.9],
            ys: vec![0.5, 0.9],
            values: vec![vec![1.0, 2.0, f64::NAN], vec![3.0, 4.0, 5.0]],
            range: (1.0, 5.0),
            ..Default::default()
        };
        let [svg, png] =
            save(&dir.path().join("fig"), &[Panel::Lines(line), Panel::Heat(heat)], 2, (400, 300)).unwrap();
        assert!(std::fs::read_to_string(svg).unwrap().contains("<svg"));
        assert_eq!(&std::fs::read(png).unwrap()[1..4], b"PNG");
    }
}
