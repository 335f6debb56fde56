//! The model registry and how users name a model.
//!
//! Known models are small TOML files in `models/` (embedded into the binary at build time by
//! `build.rs`), next to the label lists they name: adding a model is adding a file there. A user
//! names a model ([`ModelSpec`], in `spec.rs`) as
//!
//! * a registry name: `diracnet18`,
//! * an `http(s)://` URL of a `.pth` file (downloaded into the cache, hash-checked torch.hub style),
//! * a `file://` URL or a local path to a `.pth` or `.safetensors` file,
//!
//! optionally prefixed with the name to serve it under: `NAME=SOURCE`. [`Labels`] (`labels.rs`)
//! holds the class-name lists.

mod labels;
mod spec;

pub use labels::{Labels, LabelsError};
pub use spec::{ModelSpec, Source};

use serde::Deserialize;

use crate::hub;

include!(concat!(env!("OUT_DIR"), "/registry_files.rs"));

/// Errors about model names and registry files.
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
    /// Label list file inside `models/`: class names in logit order, one per line (`LABEL` or
    /// `WNID LABEL`; see [`Labels::parse`]).
    pub labels: String,
    /// Published top-1 error on ILSVRC2012 val, percent.
    pub top1_error: Option<f64>,
    /// Published top-5 error on ILSVRC2012 val, percent.
    pub top5_error: Option<f64>,
}

/// The accuracy the authors published for a model: ILSVRC2012 val, single 224 crop, percent
/// error.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Published {
    /// Top-1 error, percent.
    pub top1_error: f64,
    /// Top-5 error, percent.
    pub top5_error: f64,
}

impl RegistryEntry {
    /// The published accuracy, when the entry gives both figures.
    pub fn published(&self) -> Option<Published> {
        Some(Published {
            top1_error: self.top1_error?,
            top5_error: self.top5_error?,
        })
    }
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
            let url_prefix = hub::hash_prefix(hub::url_file_name(&entry.url));
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

/// The contents of `models/<name>`, if it was embedded.
fn embedded_file(name: &str) -> Option<&'static str> {
    EMBEDDED.iter().find(|(f, _)| *f == name).map(|(_, t)| *t)
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
}
