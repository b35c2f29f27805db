//! Wall time per fused-operator family and pass, summed over the process: where a training
//! step's forward and backward time goes (`paper-repro bench` prints it per update).
//!
//! Each forward op's `cpu_fwd` and each `bwd` (which runs the backward op inside it) starts a
//! [`Timer`] that adds its elapsed time on drop; nothing else is timed, so no time is counted
//! twice. Time outside these families — candle's own operators (embeddings, adds, the loss, the
//! lm_head's product) and the backward pass's bookkeeping — is the step's time less their sum.
//! The counters are relaxed atomics: two ops timed at once from different threads would each add
//! their own wall time (the trainer runs ops from one thread).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// The fused operators, by kernel family (one file each).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpFamily {
    Linear,
    Attention,
    Softmax,
    LayerNorm,
    Gelu,
    Conv,
    BatchNorm,
    ChannelBias,
    Relu,
    Pool,
}

impl OpFamily {
    pub const ALL: [OpFamily; 10] = [
        OpFamily::Linear,
        OpFamily::Attention,
        OpFamily::Softmax,
        OpFamily::LayerNorm,
        OpFamily::Gelu,
        OpFamily::Conv,
        OpFamily::BatchNorm,
        OpFamily::ChannelBias,
        OpFamily::Relu,
        OpFamily::Pool,
    ];

    /// The family's name in printed breakdowns.
    pub fn name(self) -> &'static str {
        match self {
            OpFamily::Linear => "linear",
            OpFamily::Attention => "attention",
            OpFamily::Softmax => "softmax",
            OpFamily::LayerNorm => "layer-norm",
            OpFamily::Gelu => "gelu",
            OpFamily::Conv => "conv",
            OpFamily::BatchNorm => "batch-norm",
            OpFamily::ChannelBias => "channel-bias",
            OpFamily::Relu => "relu",
            OpFamily::Pool => "max-pool",
        }
    }
}

/// Which pass of the op.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    Forward,
    Backward,
}

const FAMILIES: usize = OpFamily::ALL.len();

/// Nanoseconds per (family, pass), forward then backward.
static NANOS: [AtomicU64; 2 * FAMILIES] = [const { AtomicU64::new(0) }; 2 * FAMILIES];

fn slot(family: OpFamily, pass: Pass) -> usize {
    family as usize + if pass == Pass::Backward { FAMILIES } else { 0 }
}

/// Adds the time from its start to its drop to its (family, pass).
pub(super) struct Timer {
    slot: usize,
    start: Instant,
}

/// Time the rest of the calling scope as `family`'s `pass`.
pub(super) fn timer(family: OpFamily, pass: Pass) -> Timer {
    Timer { slot: slot(family, pass), start: Instant::now() }
}

impl Drop for Timer {
    fn drop(&mut self) {
        let ns = u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        NANOS[self.slot].fetch_add(ns, Ordering::Relaxed);
    }
}

/// The totals so far, in seconds: (family, forward, backward) for every family.
#[derive(Clone, Debug, PartialEq)]
pub struct OpTimes(pub Vec<(OpFamily, f64, f64)>);

impl OpTimes {
    /// The process's totals now.
    pub fn now() -> Self {
        let read = |family, pass| NANOS[slot(family, pass)].load(Ordering::Relaxed) as f64 * 1e-9;
        OpTimes(OpFamily::ALL.iter().map(|&f| (f, read(f, Pass::Forward), read(f, Pass::Backward))).collect())
    }

    /// The time from `earlier` to `self`, divided by `count` (per update, say).
    pub fn since(&self, earlier: &OpTimes, count: f64) -> OpTimes {
        OpTimes(
            self.0
                .iter()
                .zip(&earlier.0)
                .map(|(&(f, a, b), &(_, a0, b0))| (f, (a - a0) / count, (b - b0) / count))
                .collect(),
        )
    }

    /// Forward and backward summed over the families.
    pub fn total(&self) -> f64 {
        self.0.iter().map(|&(_, a, b)| a + b).sum()
    }

    /// `family fwd F bwd B` (ms) for the families that took any time, largest first.
    pub fn describe(&self) -> String {
        let mut rows: Vec<_> = self.0.iter().filter(|&&(_, a, b)| a + b > 0.0).collect();
        rows.sort_by(|x, y| (y.1 + y.2).total_cmp(&(x.1 + x.2)));
        rows.iter()
            .map(|&&(f, a, b)| format!("{} {:.1}/{:.1}", f.name(), a * 1e3, b * 1e3))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timer_adds_its_scope_to_its_family_and_pass() {
        let before = OpTimes::now();
        {
            let _t = timer(OpFamily::Pool, Pass::Backward);
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        // Other tests may run pooling meanwhile: they can only add.
        let (family, _, bwd) = OpTimes::now().since(&before, 1.0).0[OpFamily::Pool as usize];
        assert_eq!(family, OpFamily::Pool);
        assert!(bwd >= 0.02, "{bwd}");
    }

    #[test]
    fn differences_per_count_totals_and_the_description() {
        // The slots and the snapshots index families by their discriminant.
        for (i, &f) in OpFamily::ALL.iter().enumerate() {
            assert_eq!(f as usize, i, "{f:?}");
        }
        let at = |conv: (f64, f64), relu: (f64, f64)| {
            OpTimes(
                OpFamily::ALL
                    .iter()
                    .map(|&f| match f {
                        OpFamily::Conv => (f, conv.0, conv.1),
                        OpFamily::Relu => (f, relu.0, relu.1),
                        _ => (f, 1.0, 1.0),
                    })
                    .collect(),
            )
        };
        let (before, after) = (at((1.0, 1.0), (1.0, 1.0)), at((1.03, 1.05), (1.002, 1.001)));
        let d = after.since(&before, 2.0);
        assert!((d.total() - 0.0415).abs() < 1e-12, "{}", d.total());
        // Largest first, families without time left out, forward/backward in ms.
        assert_eq!(d.describe(), "conv 15.0/25.0, relu 1.0/0.5");
    }
}
