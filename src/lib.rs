//! # diracnet
//!
//! Inference for the pretrained *folded DiracNets* (Zagoruyko & Komodakis, 2017) on
//! [candle](https://github.com/huggingface/candle).
//!
//! The modules follow the data path:
//!
//! 1. [`registry`] — the known models (`models/*.toml`) and class labels; how a user names a model.
//! 2. [`weights`] — fetch the authors' `.pth` (with torch.hub's hash check), read it,
//!    fold unfolded training checkpoints, convert to safetensors in the cache.
//! 3. [`model`] — the DiracNet chain as candle layers, built from the tensor names and shapes.
//! 4. [`preprocess`] — image bytes → the normalised `[3, 224, 224]` tensor, exactly as the
//!    authors' OpenCV evaluation pipeline.
//! 5. [`classify`] — logits → softmax → top-k with labels.
//! 6. [`device`] — `auto`, `cpu`, `cuda[:N]`.
//!
//! [`server`] serves them over HTTP; [`memory`] tunes the allocator for it.

pub mod classify;
pub mod device;
pub mod memory;
pub mod model;
pub mod npy;
pub mod preprocess;
pub mod registry;
pub mod server;
pub mod weights;
