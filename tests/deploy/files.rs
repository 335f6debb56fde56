//! Reading the repository's files: text, YAML (with merge keys) and the scalars in it, the
//! paths of URLs and Go/Compose durations.

use yaml_rust2::{Yaml, YamlLoader};

use crate::common::root;

pub fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
}

/// All documents of a YAML file, with `<<` merge keys applied.
pub fn yaml(rel: &str) -> Vec<Yaml> {
    YamlLoader::load_from_str(&read(rel))
        .unwrap_or_else(|e| panic!("{rel}: invalid YAML: {e}"))
        .into_iter()
        .map(merge_keys)
        .collect()
}

fn merge_keys(node: Yaml) -> Yaml {
    match node {
        Yaml::Hash(h) => {
            let mut out = yaml_rust2::yaml::Hash::new();
            let merge = Yaml::String("<<".into());
            if let Some(Yaml::Hash(base)) = h.get(&merge) {
                for (k, v) in base {
                    out.insert(k.clone(), merge_keys(v.clone()));
                }
            }
            for (k, v) in h {
                if k != merge {
                    out.insert(k, merge_keys(v));
                }
            }
            Yaml::Hash(out)
        }
        Yaml::Array(a) => Yaml::Array(a.into_iter().map(merge_keys).collect()),
        other => other,
    }
}

pub fn present(node: &Yaml) -> bool {
    !node.is_badvalue() && !node.is_null()
}

pub fn s(node: &Yaml) -> String {
    match node {
        Yaml::String(v) | Yaml::Real(v) => v.clone(),
        Yaml::Integer(i) => i.to_string(),
        Yaml::Boolean(b) => b.to_string(),
        other => panic!("expected a scalar, found {other:?}"),
    }
}

pub fn int(node: &Yaml) -> i64 {
    match node {
        Yaml::Integer(i) => *i,
        Yaml::String(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("not an integer: {v:?}")),
        other => panic!("expected an integer, found {other:?}"),
    }
}

pub fn items(node: &Yaml) -> &[Yaml] {
    node.as_vec().map(Vec::as_slice).unwrap_or(&[])
}

pub fn entries(node: &Yaml) -> Vec<(String, &Yaml)> {
    node.as_hash()
        .map(|h| h.iter().map(|(k, v)| (s(k), v)).collect())
        .unwrap_or_default()
}

/// Paths of the `http://` URLs in `text` (`http://127.0.0.1:${PORT}/healthz` → `/healthz`).
pub fn url_paths(text: &str) -> Vec<String> {
    text.match_indices("http://")
        .map(|(i, m)| {
            let rest = &text[i + m.len()..];
            let end = rest
                .find(|c: char| c.is_whitespace() || c == '"' || c == '\'')
                .unwrap_or(rest.len());
            let url = &rest[..end];
            url.find('/').map_or("/".into(), |p| url[p..].to_string())
        })
        .collect()
}

/// Seconds of a Go/Compose duration such as `30s`, `1m30s` or `45`.
pub fn seconds(text: &str) -> u64 {
    let (mut total, mut num) = (0u64, String::new());
    for c in text.chars() {
        if c.is_ascii_digit() {
            num.push(c);
        } else {
            let n: u64 = num
                .parse()
                .unwrap_or_else(|_| panic!("bad duration {text:?}"));
            num.clear();
            total += n * match c {
                'h' => 3600,
                'm' => 60,
                's' => 1,
                _ => panic!("bad duration {text:?}"),
            };
        }
    }
    if !num.is_empty() {
        total += num.parse::<u64>().unwrap();
    }
    total
}
