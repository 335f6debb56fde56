//! `.pth` → folded safetensors, written atomically with provenance metadata.
//!
//! The output keeps the folded key names (`features.…`, `fc.…`) and records in the safetensors
//! header where the weights came from (source, its sha256, container, layout) and what they are
//! (depth, widths, blocks, classes, tool version). In the cache the file is named by the source's
//! sha256, so a second start finds it and does not convert again.

use std::{
    collections::{BTreeMap, HashMap},
    io::Write,
    path::{Path, PathBuf},
};

use super::{
    fold::{self, FoldError, FoldOrRead},
    pth::{Checkpoint, PthError},
};
use crate::{
    model::{Architecture, ArchitectureError},
    tensor::HostTensor,
};

/// Metadata key prefix in the safetensors header.
pub const META_PREFIX: &str = "diracnet.";

/// Errors converting a checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// The `.pth` could not be read.
    #[error(transparent)]
    Pth(#[from] PthError),
    /// Not a DiracNet layout, or an unfolded checkpoint with missing parts.
    #[error("{path}: {cause}")]
    Fold {
        /// The input file.
        path: PathBuf,
        /// The layout problem.
        cause: FoldError,
    },
    /// The folded tensors do not form a DiracNet chain.
    #[error("{path}: {cause}")]
    Architecture {
        /// The input file.
        path: PathBuf,
        /// The architecture problem.
        cause: ArchitectureError,
    },
    /// A safetensors header could not be read.
    #[error("{path}: not a safetensors file: {reason}")]
    Metadata {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// Writing the output failed (nothing is left behind).
    #[error("writing {path}: {reason}")]
    Write {
        /// The output file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
}

/// What a conversion produced.
#[derive(Debug, Clone)]
pub struct Converted {
    /// The safetensors file.
    pub path: PathBuf,
    /// The network's shape.
    pub architecture: Architecture,
    /// `"folded"` or `"unfolded"`: the layout found in the source.
    pub layout: &'static str,
    /// `"zip"` or `"legacy"`.
    pub container: &'static str,
}

/// Where provenance comes from: the source as the user named it and the file's sha256.
#[derive(Debug, Clone)]
pub struct Provenance {
    /// URL or path of the `.pth`.
    pub source: String,
    /// Full lowercase hex sha256 of the `.pth` file.
    pub sha256: String,
}

/// Reads `input`, folds it if it is a training checkpoint, validates the chain and writes
/// `output` atomically (temporary file in the same folder, then rename).
pub fn convert_pth(
    input: &Path,
    output: &Path,
    provenance: &Provenance,
) -> Result<Converted, ConvertError> {
    let (tensors, architecture, layout, container) = read_folded(input)?;
    let mut meta = BTreeMap::new();
    let mut put = |k: &str, v: String| meta.insert(format!("{META_PREFIX}{k}"), v);
    let join = |v: &[usize]| v.iter().map(usize::to_string).collect::<Vec<_>>().join(",");
    put("source", provenance.source.clone());
    put("source_sha256", provenance.sha256.clone());
    put("source_container", container.to_string());
    put("source_layout", layout.to_string());
    put("depth", architecture.depth().to_string());
    put("stem_width", architecture.stem_width.to_string());
    put("widths", join(&architecture.widths));
    put("blocks", join(&architecture.blocks));
    put("classes", architecture.classes.to_string());
    put("tool", format!("diracnet {}", env!("CARGO_PKG_VERSION")));
    write_safetensors(output, &tensors, meta)?;
    Ok(Converted {
        path: output.to_path_buf(),
        architecture,
        layout,
        container,
    })
}

/// Reads a `.pth` into folded, validated tensors.
#[allow(clippy::type_complexity)]
pub fn read_folded(
    input: &Path,
) -> Result<
    (
        BTreeMap<String, HostTensor>,
        Architecture,
        &'static str,
        &'static str,
    ),
    ConvertError,
> {
    let ckpt = Checkpoint::open(input)?;
    let shapes = ckpt.shapes();
    let fold_err = |cause| ConvertError::Fold {
        path: input.to_path_buf(),
        cause,
    };
    let layout = fold::detect(&shapes).map_err(fold_err)?;
    let tensors = fold::to_folded(&layout, &shapes, |k| ckpt.read_f32(k)).map_err(|e| match e {
        FoldOrRead::Fold(f) => fold_err(f),
        FoldOrRead::Read(r) => ConvertError::Pth(r),
    })?;
    let folded_shapes = tensors
        .iter()
        .map(|(k, t)| (k.clone(), t.shape.clone()))
        .collect();
    let architecture =
        Architecture::from_shapes(&folded_shapes).map_err(|cause| ConvertError::Architecture {
            path: input.to_path_buf(),
            cause,
        })?;
    Ok((tensors, architecture, layout.kind(), ckpt.container()))
}

/// Writes f32 tensors and string metadata as safetensors, atomically.
pub fn write_safetensors(
    output: &Path,
    tensors: &BTreeMap<String, HostTensor>,
    metadata: BTreeMap<String, String>,
) -> Result<(), ConvertError> {
    let err = |reason: String| ConvertError::Write {
        path: output.to_path_buf(),
        reason,
    };
    let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
        .iter()
        .map(|(k, t)| {
            let b = t.data.iter().flat_map(|v| v.to_le_bytes()).collect();
            (k.clone(), b, t.shape.clone())
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(k, b, s)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                .map(|v| (k.clone(), v))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(e.to_string()))?;
    let meta: HashMap<String, String> = metadata.into_iter().collect();
    let data = safetensors::serialize(views, Some(meta)).map_err(|e| err(e.to_string()))?;
    let dir = output
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
    let file_name = output
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!("{file_name}."))
        .suffix(".partial")
        .tempfile_in(dir)
        .map_err(|e| err(e.to_string()))?;
    tmp.write_all(&data).map_err(|e| err(e.to_string()))?;
    tmp.as_file().sync_all().map_err(|e| err(e.to_string()))?;
    tmp.persist(output).map_err(|e| err(e.to_string()))?;
    Ok(())
}

/// Reads the `diracnet.*` metadata of a safetensors file (without the prefix).
pub fn read_metadata(path: &Path) -> Result<BTreeMap<String, String>, ConvertError> {
    let err = |reason: String| ConvertError::Metadata {
        path: path.to_path_buf(),
        reason,
    };
    let mut f = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
    let mut len = [0u8; 8];
    std::io::Read::read_exact(&mut f, &mut len).map_err(|e| err(e.to_string()))?;
    let n = u64::from_le_bytes(len);
    if n > 100 << 20 {
        return Err(err(format!(
            "header of {n} bytes is not a safetensors header"
        )));
    }
    let mut header = vec![0u8; n as usize];
    std::io::Read::read_exact(&mut f, &mut header).map_err(|e| err(e.to_string()))?;
    let json: serde_json::Value =
        serde_json::from_slice(&header).map_err(|e| err(format!("bad header: {e}")))?;
    Ok(json
        .get("__metadata__")
        .and_then(|m| m.as_object())
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| {
                    Some((
                        k.strip_prefix(META_PREFIX)?.to_string(),
                        v.as_str()?.to_string(),
                    ))
                })
                .collect()
        })
        .unwrap_or_default())
}
