//! The model registry and how users name a model.
//!
//! Known models are small TOML files in `models/` (embedded into the binary at build time), next
//! to the label lists they name. A user names a model as
//!
//! * a registry name: `diracnet18`,
//! * an `http(s)://` URL of a `.pth` file (downloaded into the cache, hash-checked torch.hub style),
//! * a `file://` URL or a local path to a `.pth` or `.safetensors` file,
//!
//! optionally prefixed with the name to serve it under: `NAME=SOURCE`.

use std::{
    fmt,
    path::{Path, PathBuf},
    str::FromStr,
};

use serde::Deserialize;

include!(concat!(env!("OUT_DIR"), "/registry_files.rs"));

/// Errors about model names, registry files and label lists.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// A registry file does not parse or is inconsistent (a bug in `models/`).
    #[error("registry file models/{file}: {reason}")]
    BadEntry {
        /// File name inside `models/`.
        file: String,
        /// What is wrong.
        reason: String,
    },
    /// The model name is neither a registry name, a URL nor an existing file.
    #[error("unknown model {spec:?}: not a registry name ({known}), not an http(s)/file URL, and no such .pth/.safetensors file")]
    UnknownModel {
        /// What the user wrote.
        spec: String,
        /// Registry names, comma-separated.
        known: String,
    },
    /// `NAME=SOURCE` with an unusable NAME or SOURCE.
    #[error("invalid model spec {spec:?}: {reason}")]
    BadSpec {
        /// What the user wrote.
        spec: String,
        /// What is wrong.
        reason: String,
    },
    /// A label file could not be read.
    #[error("label file {path}: {source}")]
    LabelFile {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// How a registry model's weights are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightsKind {
    /// Plain conv weights and biases (`features.*`, `fc.*`), ready to run.
    Folded,
    /// A training checkpoint (`params` + `stats`), folded on conversion.
    Unfolded,
}

/// One known model, as declared in `models/<name>.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryEntry {
    /// Registry name, e.g. `diracnet18`.
    pub name: String,
    /// One line for humans.
    pub description: String,
    /// Where the authors published the `.pth`.
    pub url: String,
    /// sha256 prefix carried by the URL's file name (torch.hub convention), if any.
    pub sha256_prefix: Option<String>,
    /// Folded or unfolded weights.
    pub kind: WeightsKind,
    /// Network depth (18, 34).
    pub depth: u32,
    /// Label list file inside `models/`.
    pub labels: String,
    /// Published top-1 error on ILSVRC2012 val, percent.
    pub top1_error: Option<f64>,
    /// Published top-5 error on ILSVRC2012 val, percent.
    pub top5_error: Option<f64>,
}

/// All models embedded from `models/`.
#[derive(Debug, Clone)]
pub struct Registry {
    entries: Vec<RegistryEntry>,
}

impl Registry {
    /// Parses the embedded `models/*.toml` files and checks them against each other.
    pub fn builtin() -> Result<Self, RegistryError> {
        let mut entries = Vec::new();
        for (file, text) in EMBEDDED.iter().filter(|(f, _)| f.ends_with(".toml")) {
            let bad = |reason: String| RegistryError::BadEntry {
                file: file.to_string(),
                reason,
            };
            let entry: RegistryEntry = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
            if format!("{}.toml", entry.name) != *file {
                return Err(bad(format!(
                    "name {:?} does not match the file name",
                    entry.name
                )));
            }
            let url_prefix = crate::weights::fetch::hash_prefix(url_file_name(&entry.url));
            if entry.sha256_prefix.as_deref() != url_prefix {
                return Err(bad(format!(
                    "sha256_prefix {:?} differs from the prefix in the URL's file name {:?}",
                    entry.sha256_prefix, url_prefix
                )));
            }
            if embedded_file(&entry.labels).is_none() {
                return Err(bad(format!(
                    "label file {:?} is not in models/",
                    entry.labels
                )));
            }
            entries.push(entry);
        }
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Self { entries })
    }

    /// All entries, sorted by name.
    pub fn entries(&self) -> &[RegistryEntry] {
        &self.entries
    }

    /// The entry called `name`.
    pub fn get(&self, name: &str) -> Option<&RegistryEntry> {
        self.entries.iter().find(|e| e.name == name)
    }

    /// Registry names, comma-separated (for messages).
    pub fn names(&self) -> String {
        let names: Vec<&str> = self.entries.iter().map(|e| e.name.as_str()).collect();
        names.join(", ")
    }
}

fn embedded_file(name: &str) -> Option<&'static str> {
    EMBEDDED.iter().find(|(f, _)| *f == name).map(|(_, t)| *t)
}

/// The last path segment of a URL, without query or fragment.
pub fn url_file_name(url: &str) -> &str {
    let path = url.split(['?', '#']).next().unwrap_or(url);
    path.rsplit('/').next().unwrap_or(path)
}

/// Class names, one per logit index.
#[derive(Debug, Clone, PartialEq)]
pub struct Labels(Vec<String>);

impl Labels {
    /// The 1000 ILSVRC2012 class names in the standard index order (281 = "tabby, tabby cat").
    pub fn imagenet() -> Self {
        Self::parse(embedded_file("imagenet_classes.txt").unwrap_or_default())
    }

    /// Reads a label file: one class name per line, in logit order.
    pub fn from_file(path: &Path) -> Result<Self, RegistryError> {
        let text = std::fs::read_to_string(path).map_err(|source| RegistryError::LabelFile {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self::parse(&text))
    }

    fn parse(text: &str) -> Self {
        Self(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect(),
        )
    }

    /// The label list for a model with `classes` outputs: the ImageNet names for 1000 classes,
    /// none otherwise (labels are then reported as null).
    pub fn for_classes(classes: usize) -> Option<Self> {
        let imagenet = Self::imagenet();
        (imagenet.len() == classes).then_some(imagenet)
    }

    /// Number of classes named.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when no class is named.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The name of class `index`.
    pub fn get(&self, index: usize) -> Option<&str> {
        self.0.get(index).map(String::as_str)
    }
}

/// Where a model's weights come from.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    /// A registry model.
    Registry(RegistryEntry),
    /// An `http(s)://` URL of a `.pth` file.
    Url(String),
    /// A local `.pth` or `.safetensors` file.
    File(PathBuf),
}

impl PartialEq for RegistryEntry {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Registry(e) => write!(f, "{} ({})", e.name, e.url),
            Source::Url(u) => f.write_str(u),
            Source::File(p) => write!(f, "{}", p.display()),
        }
    }
}

/// A model as the user named it: the name it is served under and where its weights come from.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    /// Serving name (registry name, `NAME=` prefix, or the file stem).
    pub name: String,
    /// Weights source.
    pub source: Source,
}

impl ModelSpec {
    /// Parses `NAME=SOURCE` or `SOURCE` against `registry`.
    pub fn parse(spec: &str, registry: &Registry) -> Result<Self, RegistryError> {
        let spec = spec.trim();
        let bad = |reason: &str| RegistryError::BadSpec {
            spec: spec.to_string(),
            reason: reason.to_string(),
        };
        let (name, source) = match spec.split_once('=') {
            Some((n, s)) if !is_url(spec) => {
                if !valid_name(n) {
                    return Err(bad("NAME may only hold letters, digits, '.', '_' and '-'"));
                }
                (Some(n.to_string()), s)
            }
            _ => (None, spec),
        };
        if source.is_empty() {
            return Err(bad("empty SOURCE"));
        }
        let source = if let Some(entry) = registry.get(source) {
            Source::Registry(entry.clone())
        } else if source.starts_with("http://") || source.starts_with("https://") {
            Source::Url(source.to_string())
        } else if let Some(path) = source.strip_prefix("file://") {
            Source::File(PathBuf::from(path))
        } else {
            let path = PathBuf::from(source);
            let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
            let known_ext = matches!(ext, "pth" | "pt" | "safetensors" | "pt7");
            if !(known_ext || path.is_file()) {
                return Err(RegistryError::UnknownModel {
                    spec: spec.to_string(),
                    known: registry.names(),
                });
            }
            Source::File(path)
        };
        let name = match name {
            Some(n) => n,
            None => default_name(&source),
        };
        if !valid_name(&name) {
            return Err(bad(
                "cannot derive a model name from SOURCE; use NAME=SOURCE",
            ));
        }
        Ok(Self { name, source })
    }
}

impl FromStr for ModelSpec {
    type Err = RegistryError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s, &Registry::builtin()?)
    }
}

fn is_url(s: &str) -> bool {
    ["http://", "https://", "file://"]
        .iter()
        .any(|p| s.starts_with(p))
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 128
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// `diracnet18v2folded-a2174e15.pth` → `diracnet18v2folded`: the file stem without the hash part.
fn default_name(source: &Source) -> String {
    let file = match source {
        Source::Registry(e) => return e.name.clone(),
        Source::Url(u) => url_file_name(u).to_string(),
        Source::File(p) => p
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default(),
    };
    let stem = file.split('.').next().unwrap_or_default();
    match crate::weights::fetch::hash_prefix(&file) {
        Some(prefix) if !prefix.is_empty() => stem
            .strip_suffix(&format!("-{prefix}"))
            .unwrap_or(stem)
            .to_string(),
        _ => stem.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_registry_parses_and_is_consistent() {
        let reg = Registry::builtin().expect("registry");
        let names: Vec<_> = reg.entries().iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "diracnet18",
                "diracnet18-checkpoint",
                "diracnet34",
                "diracnet34-checkpoint"
            ]
        );
        let dn18 = reg.get("diracnet18").unwrap();
        assert_eq!(dn18.sha256_prefix.as_deref(), Some("a2174e15"));
        assert_eq!(dn18.kind, WeightsKind::Folded);
        assert_eq!(reg.get("diracnet34").unwrap().depth, 34);
        assert_eq!(
            reg.get("diracnet34-checkpoint").unwrap().kind,
            WeightsKind::Unfolded
        );
    }

    #[test]
    fn imagenet_labels_are_in_ilsvrc_order() {
        let l = Labels::imagenet();
        assert_eq!(l.len(), 1000);
        assert_eq!(l.get(0), Some("tench, Tinca tinca"));
        assert_eq!(l.get(281), Some("tabby, tabby cat"));
        assert_eq!(
            l.get(999),
            Some("toilet tissue, toilet paper, bathroom tissue")
        );
        assert!(Labels::for_classes(1000).is_some());
        assert!(Labels::for_classes(10).is_none());
    }

    #[test]
    fn specs_parse() {
        let reg = Registry::builtin().unwrap();
        let s = ModelSpec::parse("diracnet18", &reg).unwrap();
        assert_eq!(s.name, "diracnet18");
        assert!(matches!(s.source, Source::Registry(ref e) if e.name == "diracnet18"));

        let s = ModelSpec::parse("fast=diracnet34", &reg).unwrap();
        assert_eq!(s.name, "fast");
        assert!(matches!(s.source, Source::Registry(ref e) if e.name == "diracnet34"));

        let s = ModelSpec::parse("https://h/x/diracnet18v2folded-a2174e15.pth?a=b", &reg).unwrap();
        assert_eq!(s.name, "diracnet18v2folded");
        assert!(matches!(s.source, Source::Url(_)));

        let s = ModelSpec::parse("m=file:///tmp/w.safetensors", &reg).unwrap();
        assert_eq!(s.name, "m");
        assert_eq!(s.source, Source::File(PathBuf::from("/tmp/w.safetensors")));

        let s = ModelSpec::parse("/does/not/exist/mine.pth", &reg).unwrap();
        assert_eq!(s.name, "mine");

        let e = ModelSpec::parse("diracnet19", &reg).unwrap_err();
        assert!(
            e.to_string().contains("diracnet18, diracnet18-checkpoint"),
            "{e}"
        );
        assert!(ModelSpec::parse("bad name=diracnet18", &reg).is_err());
        assert!(ModelSpec::parse("x=", &reg).is_err());
    }

    #[test]
    fn url_file_names() {
        assert_eq!(url_file_name("https://a/b/c.pth"), "c.pth");
        assert_eq!(url_file_name("https://a/b/c.pth?x=1#f"), "c.pth");
    }
}
