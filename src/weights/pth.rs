//! Reading PyTorch `.pth` checkpoints.
//!
//! The authors' files are PyTorch-0.3-era *legacy* streams (five pickles, then raw storages,
//! tensors rebuilt by the 4-argument `torch._utils._rebuild_tensor`), which candle cannot read.
//! We use the `pytorch-reader` crate, which reads zip (torch ≥ 1.6), legacy (0.1.10–1.5) and
//! tar (≤ 0.1.9) containers with storage offsets, strides and shared storages. Tar files
//! predate every DiracNet and are refused with a clear message.
//!
//! Tensors are read lazily: opening parses the pickle only, so an unfolded training
//! checkpoint's optimizer state is never loaded.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use pytorch_reader::{DType, FileFormat, PytorchReader};

use crate::tensor::HostTensor;

/// Errors reading a `.pth` file.
#[derive(Debug, thiserror::Error)]
pub enum PthError {
    /// Not a PyTorch checkpoint we can read (corrupt, truncated, another format).
    #[error("{path}: not a readable PyTorch checkpoint: {reason}")]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        reason: String,
    },
    /// A tar-era checkpoint (torch ≤ 0.1.9).
    #[error("{path}: tar-format checkpoint (torch <= 0.1.9) is not supported; re-save it with a newer torch")]
    TarFormat {
        /// The file.
        path: PathBuf,
    },
    /// A tensor's bytes could not be read (storage missing or shorter than declared).
    #[error("{path}: tensor {name}: {reason}")]
    Tensor {
        /// The file.
        path: PathBuf,
        /// Tensor name.
        name: String,
        /// What went wrong.
        reason: String,
    },
}

/// A tar archive carries `ustar` at offset 257 (torch's own test, too).
fn is_tar(path: &Path) -> bool {
    use std::io::{Read, Seek, SeekFrom};
    let mut magic = [0u8; 5];
    std::fs::File::open(path)
        .and_then(|mut f| {
            f.seek(SeekFrom::Start(257))?;
            f.read_exact(&mut magic)
        })
        .is_ok()
        && &magic == b"ustar"
}

/// An opened `.pth` file: tensor names and shapes, bytes read on demand.
pub struct Checkpoint {
    path: PathBuf,
    reader: PytorchReader,
}

impl Checkpoint {
    /// Opens and parses `path` (zip or legacy container).
    pub fn open(path: &Path) -> Result<Self, PthError> {
        if is_tar(path) {
            return Err(PthError::TarFormat {
                path: path.to_path_buf(),
            });
        }
        let reader = PytorchReader::new(path).map_err(|e| PthError::Unreadable {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        match reader.metadata().format_type {
            FileFormat::Tar => Err(PthError::TarFormat {
                path: path.to_path_buf(),
            }),
            _ => Ok(Self {
                path: path.to_path_buf(),
                reader,
            }),
        }
    }

    /// `"zip"` or `"legacy"` (or `"pickle"` for a bare pickle without tensors).
    pub fn container(&self) -> &'static str {
        match self.reader.metadata().format_type {
            FileFormat::Zip => "zip",
            FileFormat::Legacy => "legacy",
            FileFormat::Tar => "tar",
            FileFormat::Pickle => "pickle",
        }
    }

    /// Tensor names and shapes, sorted by name.
    pub fn shapes(&self) -> BTreeMap<String, Vec<usize>> {
        self.reader
            .tensors()
            .iter()
            .map(|(k, t)| (k.clone(), t.shape().to_vec()))
            .collect()
    }

    /// Reads tensor `name`, converting floating-point storages to `f32`.
    pub fn read_f32(&self, name: &str) -> Result<HostTensor, PthError> {
        let err = |reason: String| PthError::Tensor {
            path: self.path.clone(),
            name: name.to_string(),
            reason,
        };
        let t = self
            .reader
            .get(name)
            .ok_or_else(|| err("not in the file".into()))?;
        let bytes = t.read().map_err(|e| err(e.to_string()))?;
        let data: Vec<f32> = match t.dtype() {
            DType::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            DType::F64 => bytes
                .chunks_exact(8)
                .map(|c| {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(c);
                    f64::from_ne_bytes(b) as f32
                })
                .collect(),
            DType::F16 => bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_ne_bytes([c[0], c[1]]).to_f32())
                .collect(),
            DType::BF16 => bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_ne_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => return Err(err(format!("dtype {other:?} is not floating point"))),
        };
        if data.len() != t.num_elements() {
            return Err(err(format!(
                "read {} values, shape {:?} needs {}",
                data.len(),
                t.shape(),
                t.num_elements()
            )));
        }
        Ok(HostTensor {
            shape: t.shape().to_vec(),
            data,
        })
    }
}
