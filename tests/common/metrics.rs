//! A strict reader of the OpenMetrics text format, for tests: every line must be a
//! descriptor, a sample of a described family, or the final `# EOF`; label values must be
//! quoted and escaped; histogram buckets must be cumulative and end in `+Inf` = count.
//! Anything else fails the test, so a malformed exposition cannot pass as an empty one.
#![allow(
    dead_code,
    reason = "each test binary uses a different part of the harness"
)]

use std::collections::{BTreeMap, HashMap};

pub type Labels = BTreeMap<String, String>;

#[derive(Debug, Default)]
pub struct Exposition {
    /// family name -> type
    pub types: HashMap<String, String>,
    /// (sample name, labels) -> value
    pub samples: HashMap<(String, Labels), f64>,
}

impl Exposition {
    /// The value of `name` with exactly these labels (0 when absent).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let labels: Labels = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.samples
            .get(&(name.to_owned(), labels))
            .copied()
            .unwrap_or(0.0)
    }

    pub fn has(&self, name: &str, labels: &[(&str, &str)]) -> bool {
        let labels: Labels = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.samples.contains_key(&(name.to_owned(), labels))
    }
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// Parses `text` or panics naming the offending line.
pub fn parse(text: &str) -> Exposition {
    let mut out = Exposition::default();
    assert!(text.ends_with("# EOF\n"), "exposition must end with # EOF");
    let lines: Vec<&str> = text.lines().collect();
    let mut saw_eof = false;
    for (i, line) in lines.iter().enumerate() {
        let at = i + 1;
        assert!(!saw_eof, "line {at}: content after # EOF");
        if *line == "# EOF" {
            saw_eof = true;
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (keyword, name) = (parts.next(), parts.next());
            let name = name.unwrap_or_else(|| panic!("line {at}: descriptor without name"));
            assert!(valid_name(name), "line {at}: bad family name {name:?}");
            match keyword {
                Some("HELP") | Some("UNIT") => {}
                Some("TYPE") => {
                    let kind = parts.next().unwrap_or_default();
                    assert!(
                        [
                            "counter",
                            "gauge",
                            "histogram",
                            "summary",
                            "info",
                            "stateset",
                            "unknown"
                        ]
                        .contains(&kind),
                        "line {at}: unknown type {kind:?}"
                    );
                    let previous = out.types.insert(name.to_owned(), kind.to_owned());
                    assert!(
                        previous.is_none(),
                        "line {at}: family {name} described twice"
                    );
                }
                other => panic!("line {at}: unknown descriptor {other:?}"),
            }
            continue;
        }
        let (name, labels, value) =
            sample(line).unwrap_or_else(|why| panic!("line {at}: {why}: {line}"));
        let family = family_of(&out.types, &name)
            .unwrap_or_else(|| panic!("line {at}: sample {name} of no described family"));
        let _ = family;
        let previous = out.samples.insert((name.clone(), labels.clone()), value);
        assert!(
            previous.is_none(),
            "line {at}: duplicate series {name}{labels:?}"
        );
    }
    assert!(saw_eof, "no # EOF");
    check_histograms(&out);
    out
}

/// The described family a sample belongs to, by the suffixes its type allows.
fn family_of<'a>(types: &'a HashMap<String, String>, sample: &str) -> Option<&'a str> {
    for (family, kind) in types {
        let suffixes: &[&str] = match kind.as_str() {
            "counter" => &["_total", "_created"],
            "histogram" => &["_bucket", "_sum", "_count", "_created"],
            "info" => &["_info"],
            _ => &[""],
        };
        if suffixes.iter().any(|s| {
            sample.strip_suffix(s) == Some(family.as_str()) || (s.is_empty() && sample == family)
        }) {
            return Some(family);
        }
    }
    None
}

fn sample(line: &str) -> Result<(String, Labels, f64), String> {
    let name_end = line.find(['{', ' ']).ok_or("no value")?;
    let name = &line[..name_end];
    if !valid_name(name) {
        return Err(format!("bad metric name {name:?}"));
    }
    let chars: Vec<char> = line[name_end..].chars().collect();
    let mut i = 0;
    let mut labels = Labels::new();
    if chars.first() == Some(&'{') {
        i = 1;
        loop {
            if chars.get(i) == Some(&'}') {
                i += 1;
                break;
            }
            let key_start = i;
            while chars.get(i).is_some_and(|c| *c != '=') {
                i += 1;
            }
            let key: String = chars
                .get(key_start..i)
                .ok_or("label without =")?
                .iter()
                .collect();
            if !valid_name(&key) || key.contains(':') {
                return Err(format!("bad label name {key:?}"));
            }
            i += 1; // '='
            if chars.get(i) != Some(&'"') {
                return Err("label value not quoted".into());
            }
            i += 1;
            let mut value = String::new();
            loop {
                match chars.get(i) {
                    Some('\\') => {
                        match chars.get(i + 1) {
                            Some('\\') => value.push('\\'),
                            Some('"') => value.push('"'),
                            Some('n') => value.push('\n'),
                            other => return Err(format!("bad escape {other:?}")),
                        }
                        i += 2;
                    }
                    Some('"') => {
                        i += 1;
                        break;
                    }
                    None => return Err("unterminated label value".into()),
                    Some(c) => {
                        value.push(*c);
                        i += 1;
                    }
                }
            }
            if labels.insert(key.clone(), value).is_some() {
                return Err(format!("label {key} twice"));
            }
            match chars.get(i) {
                Some(',') => i += 1,
                Some('}') => {
                    i += 1;
                    break;
                }
                other => return Err(format!("expected , or }} after a label, got {other:?}")),
            }
        }
    }
    if chars.get(i) != Some(&' ') {
        return Err("no space before value".into());
    }
    let rest: String = chars.get(i + 1..).unwrap_or_default().iter().collect();
    let value_text = rest.split(' ').next().unwrap_or_default();
    let value = match value_text {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse::<f64>().map_err(|_| format!("bad value {v:?}"))?,
    };
    Ok((name.to_owned(), labels, value))
}

fn check_histograms(exposition: &Exposition) {
    for (family, kind) in &exposition.types {
        if kind != "histogram" {
            continue;
        }
        let mut series: HashMap<Labels, Vec<(f64, f64)>> = HashMap::new();
        for ((name, labels), value) in &exposition.samples {
            if name.strip_suffix("_bucket") == Some(family.as_str()) {
                let mut rest = labels.clone();
                let le = rest.remove("le").expect("bucket without le");
                let bound = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().expect("numeric le")
                };
                series.entry(rest).or_default().push((bound, *value));
            }
        }
        for (labels, mut buckets) in series {
            buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
            assert!(
                buckets.windows(2).all(|w| w[0].1 <= w[1].1),
                "{family}{labels:?}: buckets not cumulative"
            );
            let last = buckets.last().expect("buckets");
            assert_eq!(last.0, f64::INFINITY, "{family}{labels:?}: no +Inf bucket");
            let count = exposition
                .samples
                .get(&(format!("{family}_count"), labels.clone()))
                .expect("histogram without _count");
            assert_eq!(last.1, *count, "{family}{labels:?}: +Inf bucket != count");
        }
    }
}

/// Scrapes `url`, checks the content type, and parses.
pub async fn scrape(url: &str) -> Exposition {
    let response = reqwest::get(url).await.expect("scrape");
    assert_eq!(response.status().as_u16(), 200, "scrape {url}");
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    parse(&response.text().await.expect("body"))
}
