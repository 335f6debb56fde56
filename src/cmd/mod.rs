//! The subcommands, one file each: its flags (a clap `Args` struct) and its `run`. What they
//! share lives here: [`ModelArgs`], the options of every subcommand that loads a model.

pub mod bench;
pub mod classify;
pub mod convert;
pub mod eval;
pub mod fetch;
pub mod models;
pub mod output;
pub mod preprocess;
pub mod serve;

use std::{io::IsTerminal, path::PathBuf};

use anyhow::Result;
use clap::{Args, ValueEnum};
use diracnet::{
    device::DeviceSpec,
    model::{Backend, ConvImpl, Precision},
    registry::{ModelSpec, Registry},
    weights::{cache, WeightsOptions},
};

/// Options of every subcommand that loads a model.
#[derive(Args)]
pub struct ModelArgs {
    /// Model: registry name, http(s)/file URL, or .pth/.safetensors path; `NAME=SOURCE` to rename.
    /// Repeat for several.
    #[arg(
        long = "model",
        short = 'm',
        env = "DIRACNET_MODEL",
        value_delimiter = ',',
        default_value = "diracnet18"
    )]
    pub models: Vec<String>,
    /// Class names for a model from a file: `NAME=FILE`, or `FILE` with one model. One label per
    /// line in logit order, or `WNID LABEL` per line; it must name as many classes as the model
    /// has. Repeat for several models. [default: the registry's list, else ImageNet's for
    /// 1000-class models]
    #[arg(long = "labels", env = "DIRACNET_LABELS", value_delimiter = ',')]
    pub labels: Vec<String>,
    /// Cache folder for downloads and converted weights
    /// [default: $XDG_CACHE_HOME/diracnet or ~/.cache/diracnet].
    #[arg(long, env = "DIRACNET_CACHE")]
    pub cache_dir: Option<PathBuf>,
    /// Never use the network; a model missing from the caches is an error.
    #[arg(long, env = "DIRACNET_OFFLINE", value_parser = clap::builder::BoolishValueParser::new())]
    pub offline: bool,
    /// Device: auto, cpu, cuda or cuda:N.
    #[arg(long, env = "DIRACNET_DEVICE", default_value = "auto")]
    pub device: DeviceSpec,
    /// Convolutions: `fast` (CPU: NHWC, packed weights; each 3×3 conv runs Winograd or direct,
    /// whichever is faster for its size), `winograd` or `direct` (the fast path with one 3×3
    /// algorithm everywhere, for tests and comparisons), `candle` (candle's conv2d, any
    /// device), or `auto` (fast on CPU, candle on CUDA).
    #[arg(
        long,
        env = "DIRACNET_CONV_IMPL",
        default_value = "auto",
        value_parser = choice::<ConvImpl>
    )]
    pub conv_impl: ConvImpl,
    /// Compute dtype: auto (f16 on CUDA, f32 on CPU), f32, f16 or bf16. On the CPU, f16 needs
    /// `--conv-impl candle`, and bf16 a CPU with AVX512-BF16 (the fast path's convs with bf16
    /// products).
    #[arg(
        long,
        env = "DIRACNET_DTYPE",
        default_value = "auto",
        value_parser = choice::<Precision>
    )]
    pub dtype: Precision,
}

/// Parses one of `T`'s names (or aliases), ignoring case and surrounding blanks; the error lists
/// the choices: "expected auto, fast or candle".
fn choice<T: ValueEnum>(s: &str) -> Result<T, String> {
    T::from_str(s.trim(), true).map_err(|_| {
        let names: Vec<String> = T::value_variants()
            .iter()
            .filter_map(|v| v.to_possible_value().map(|p| p.get_name().to_string()))
            .collect();
        match names.split_last() {
            Some((last, [])) => format!("expected {last}"),
            Some((last, rest)) => format!("expected {} or {last}", rest.join(", ")),
            None => "no value is accepted".to_string(),
        }
    })
}

/// Warns when JPEGs will decode without SIMD (a build without `nasm`): about 3× slower, and
/// cargo does not show the build's own warning.
pub fn warn_without_jpeg_simd() {
    if !diracnet::preprocess::jpeg_simd() {
        tracing::warn!(
            "JPEG decoding runs without SIMD (built without nasm): about 3x slower; install \
             nasm (apt-get install nasm) and rebuild"
        );
    }
}

/// Loads `spec` on `backend` (fetching and converting as needed) and logs how it computes.
pub async fn load_model(
    spec: &ModelSpec,
    opts: &WeightsOptions,
    backend: &Backend,
) -> Result<diracnet::classifier::Classifier> {
    use anyhow::Context as _;
    let started = std::time::Instant::now();
    let clf = diracnet::classifier::Classifier::load(spec, opts, backend)
        .await
        .with_context(|| format!("model {}", spec.name))?;
    tracing::info!(
        model = %clf.name,
        device = %diracnet::device::describe(backend.device()),
        conv = %backend.conv_description(),
        dtype = backend.dtype_name(),
        seconds = started.elapsed().as_secs_f64(),
        "model loaded"
    );
    Ok(clf)
}

impl ModelArgs {
    /// The models as named, resolved against the built-in registry.
    pub fn specs(&self) -> Result<Vec<ModelSpec>> {
        let registry = Registry::builtin()?;
        let mut specs = self
            .models
            .iter()
            .map(|m| Ok(ModelSpec::parse(m, &registry)?))
            .collect::<Result<Vec<ModelSpec>>>()?;
        for given in &self.labels {
            let (name, file) = match given.split_once('=') {
                Some((name, file)) => (Some(name.trim()), file.trim()),
                None => (None, given.trim()),
            };
            let spec = match name {
                Some(name) => specs.iter_mut().find(|s| s.name == name).ok_or_else(|| {
                    let served: Vec<&str> = self.models.iter().map(String::as_str).collect();
                    anyhow::anyhow!(
                        "--labels {given}: no model named {name:?} (models: {})",
                        served.join(", ")
                    )
                })?,
                None if specs.len() == 1 => &mut specs[0],
                None => anyhow::bail!(
                    "--labels {given}: with several models, say which one: --labels NAME=FILE"
                ),
            };
            spec.labels = Some(PathBuf::from(file));
        }
        Ok(specs)
    }

    /// Opens the device and resolves the conv implementation and dtype for it.
    pub fn backend(&self) -> Result<Backend> {
        Ok(Backend::new(
            self.device.open()?,
            self.conv_impl,
            self.dtype,
        )?)
    }

    /// Cache and network options (a progress bar when stderr is a terminal).
    pub fn weights_options(&self) -> WeightsOptions {
        let root = self
            .cache_dir
            .clone()
            .unwrap_or_else(cache::default_cache_dir);
        WeightsOptions::new(root, self.offline, std::io::stderr().is_terminal())
    }
}
