//! How a user names a model: `NAME=SOURCE` or `SOURCE`, where SOURCE is a registry name, a URL
//! or a file. "Source" means this throughout: where a model's weights come from.

use std::{fmt, path::PathBuf, str::FromStr};

use super::{Registry, RegistryEntry, RegistryError};
use crate::hub;

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
    /// A label file given for this model (`--labels NAME=FILE`), which takes the place of the
    /// list its source would get.
    pub labels: Option<PathBuf>,
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
            Some((n, s)) if !has_url_scheme(spec) => {
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
        Ok(Self {
            name,
            source,
            labels: None,
        })
    }
}

impl FromStr for ModelSpec {
    type Err = RegistryError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s, &Registry::builtin()?)
    }
}

/// Whether `s` starts with a URL scheme we take (then a `=` in it is not `NAME=`).
fn has_url_scheme(s: &str) -> bool {
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
        Source::Url(u) => hub::url_file_name(u).to_string(),
        Source::File(p) => p
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default(),
    };
    hub::model_stem(&file).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
