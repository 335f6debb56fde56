//! The folded DiracNet as a chain of candle layers.
//!
//! After folding, a DiracNet is as plain as VGG (PyTorch semantics):
//!
//! ```text
//! conv 7×7/2 pad 3 (+bias) → maxpool 3/2 pad 1
//! → for each group g: [ReLU → conv 3×3 pad 1 (+bias)] × blocks[g], then maxpool 2 (all but the last group)
//! → ReLU → average over the whole map → linear
//! ```
//!
//! * [`architecture`] — the shape (groups, blocks, widths, classes), read from the tensor names
//!   and shapes, so any folded DiracNet loads and every mismatch is an error naming the key;
//!   [`random`] gives any shape deterministic random weights.
//! * [`backend`] — device, convolution implementation (`--conv-impl`) and dtype (`--dtype`).
//! * [`layers`] — [`Stem`](layers::Stem), [`Block`](layers::Block), [`Group`](layers::Group),
//!   [`Head`](layers::Head): one struct per layer with `load` and `forward`.
//! * [`net`] — [`DiracNet`]: the chain, from a safetensors file ([`file`](mod@file): read one tensor at a
//!   time) or tensors.
//! * [`cpu`] — the fast CPU path's kernels as candle custom ops (GEMM, Winograd, pooling). A new
//!   SIMD kernel goes there, next to its portable twin.
//! * [`profile`] — where a pass's time goes, layer by layer (`diracnet bench --profile`).

pub mod architecture;
pub mod backend;
pub mod cpu;
pub mod file;
pub mod layers;
pub mod net;
pub mod profile;
pub mod random;

pub use architecture::{Architecture, ArchitectureError};
pub use backend::{Backend, ConvImpl, Precision};
pub use net::DiracNet;

use crate::tensor::INPUT_SIZE;

/// Errors building or running the model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The tensors do not form a folded DiracNet.
    #[error(transparent)]
    Architecture(#[from] ArchitectureError),
    /// A tensor has a dtype we do not run.
    #[error("tensor {key} has dtype {dtype:?}; expected a floating-point type")]
    DType {
        /// Tensor name.
        key: String,
        /// Its dtype.
        dtype: String,
    },
    /// The safetensors file could not be read.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// Input of the wrong shape.
    #[error("input has shape {found:?}, expected [N, 3, {INPUT_SIZE}, {INPUT_SIZE}]")]
    InputShape {
        /// Its shape.
        found: Vec<usize>,
    },
    /// A device / implementation / dtype combination that cannot run.
    #[error("{0}")]
    Backend(String),
    /// An error inside candle.
    #[error("candle: {0}")]
    Candle(candle_core::Error),
}

// By hand, not `#[from]`, which would also make candle's error the `source()` and print it
// twice in an error chain: the message carries it.
impl From<candle_core::Error> for ModelError {
    fn from(e: candle_core::Error) -> Self {
        Self::Candle(e)
    }
}
