//! Weights: fetch → read → fold → convert.
//!
//! [`resolve`] turns a [`ModelSpec`] into a folded safetensors file on local disk:
//!
//! 1. [`fetch`] — an http(s) source is downloaded into the cache (or found there, or in the
//!    torch.hub cache) and its sha256 prefix checked, torch.hub style;
//! 2. [`pth`] — the `.pth` is parsed (zip or legacy container);
//! 3. [`fold`] — a training checkpoint is folded into plain conv weights;
//! 4. [`convert`] — the result is written as safetensors, named by the source's sha256 in
//!    [`cache::CacheLayout::converted`], so later starts skip steps 2–4.

pub mod cache;
pub mod convert;
pub mod fetch;
pub mod fold;
pub mod pth;

use std::path::{Path, PathBuf};

use crate::registry::{ModelSpec, Source};

/// Errors turning a model spec into a local safetensors file.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    /// Download or cache lookup failed.
    #[error(transparent)]
    Fetch(#[from] fetch::FetchError),
    /// Reading, folding or writing failed.
    #[error(transparent)]
    Convert(#[from] convert::ConvertError),
    /// A local weights file does not exist or cannot be read.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
}

/// Where weights are cached and whether the network may be used.
#[derive(Debug, Clone)]
pub struct WeightsOptions {
    /// Cache root (`--cache-dir`).
    pub cache: cache::CacheLayout,
    /// Never touch the network (`--offline`).
    pub offline: bool,
    /// Show a progress bar while downloading.
    pub progress: bool,
    /// torch.hub's checkpoint folder, searched before downloading.
    pub torch_hub_dir: Option<PathBuf>,
}

impl WeightsOptions {
    /// Options for `cache_root`, with the torch.hub folder found from the environment.
    pub fn new(cache_root: PathBuf, offline: bool, progress: bool) -> Self {
        Self {
            cache: cache::CacheLayout { root: cache_root },
            offline,
            progress,
            torch_hub_dir: cache::torch_hub_checkpoints_dir(),
        }
    }

    fn fetch_options(&self) -> fetch::FetchOptions {
        let mut o = fetch::FetchOptions::new(self.cache.checkpoints());
        o.torch_hub_dir = self.torch_hub_dir.clone();
        o.offline = self.offline;
        o.progress = self.progress;
        o
    }
}

/// A model's weights, ready to load.
#[derive(Debug, Clone)]
pub struct ResolvedWeights {
    /// Folded safetensors file.
    pub path: PathBuf,
    /// The source as named (URL or path).
    pub source: String,
    /// sha256 of the source file, when it was a `.pth`.
    pub source_sha256: Option<String>,
    /// True when this call converted the `.pth` (false: found in the cache).
    pub converted: bool,
}

/// Fetches and converts the weights behind `spec`, reusing the cache where possible.
pub async fn resolve(
    spec: &ModelSpec,
    opts: &WeightsOptions,
) -> Result<ResolvedWeights, WeightsError> {
    match &spec.source {
        Source::Registry(entry) => resolve_url(&entry.url, opts).await,
        Source::Url(url) => resolve_url(url, opts).await,
        Source::File(path) => resolve_file(path, opts).await,
    }
}

async fn resolve_url(url: &str, opts: &WeightsOptions) -> Result<ResolvedWeights, WeightsError> {
    let fetched = fetch::fetch_url(url, &opts.fetch_options()).await?;
    convert_cached(&fetched.path, url, fetched.sha256, opts).await
}

async fn resolve_file(path: &Path, opts: &WeightsOptions) -> Result<ResolvedWeights, WeightsError> {
    let file_err = |reason: String| WeightsError::File {
        path: path.to_path_buf(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| file_err(e.to_string()))?;
    if !meta.is_file() {
        return Err(file_err("not a regular file".into()));
    }
    if path.extension().and_then(|e| e.to_str()) == Some("safetensors") {
        return Ok(ResolvedWeights {
            path: path.to_path_buf(),
            source: path.display().to_string(),
            source_sha256: None,
            converted: false,
        });
    }
    let p = path.to_path_buf();
    let sha = tokio::task::spawn_blocking(move || fetch::sha256_file(&p))
        .await
        .map_err(|e| file_err(e.to_string()))?
        .map_err(|e| file_err(e.to_string()))?;
    convert_cached(path, &path.display().to_string(), sha, opts).await
}

/// Converts `pth` unless `<cache>/converted/<sha256>.safetensors` already exists.
async fn convert_cached(
    pth: &Path,
    source: &str,
    sha256: String,
    opts: &WeightsOptions,
) -> Result<ResolvedWeights, WeightsError> {
    let out = opts.cache.converted().join(format!("{sha256}.safetensors"));
    let mut resolved = ResolvedWeights {
        path: out.clone(),
        source: source.to_string(),
        source_sha256: Some(sha256.clone()),
        converted: false,
    };
    if out.is_file() {
        tracing::info!(source, path = %out.display(), "using converted weights from the cache");
        return Ok(resolved);
    }
    let provenance = convert::Provenance {
        source: source.to_string(),
        sha256,
    };
    let input = pth.to_path_buf();
    let started = std::time::Instant::now();
    let converted =
        tokio::task::spawn_blocking(move || convert::convert_pth(&input, &out, &provenance))
            .await
            .map_err(|e| WeightsError::File {
                path: pth.to_path_buf(),
                reason: format!("conversion task failed: {e}"),
            })??;
    tracing::info!(
        source,
        path = %converted.path.display(),
        layout = converted.layout,
        container = converted.container,
        depth = converted.architecture.depth(),
        classes = converted.architecture.classes,
        seconds = started.elapsed().as_secs_f64(),
        "converted weights to safetensors"
    );
    resolved.converted = true;
    Ok(resolved)
}
