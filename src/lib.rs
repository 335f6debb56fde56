//! # diracnet
//!
//! Inference for the pretrained *folded DiracNets* (Zagoruyko & Komodakis, 2017) on
//! [candle](https://github.com/huggingface/candle).
//!
//! The modules follow the data path, and each imports only from the ones before it:
//!
//! 0. Ground floor, the vocabulary every layer shares: [`tensor`] (a host tensor, the network
//!    input's size), [`hub`] (torch.hub's naming rules for checkpoint URLs), [`device`] (`auto`,
//!    `cpu`, `cuda[:N]`), [`npy`] (`.npy` files of host tensors), [`panic`](mod@panic) (a caught panic as a
//!    message), [`memory`] (allocator settings, peak memory), [`priority`] (the HTTP threads
//!    yield to the model's).
//! 1. [`registry`] — the known models (`models/*.toml`), their label lists, how a user names a
//!    model.
//! 2. [`model`] — the DiracNet chain as candle layers: architecture, backend choice, layers, and
//!    the fast CPU kernels.
//! 3. [`weights`] — fetch the authors' `.pth` (with torch.hub's hash check), read it, fold
//!    unfolded training checkpoints, convert to safetensors in the cache.
//! 4. [`prediction`] — logits → softmax scores and the top-k classes with their labels;
//!    [`classifier`] — [`classifier::Classifier::load`]: a model by name, loaded and labelled,
//!    whose logits become predictions.
//! 5. [`preprocess`] — image bytes → the normalised `[3, 224, 224]` tensor, exactly as the
//!    authors' OpenCV evaluation pipeline.
//! 6. [`batcher`] — dynamic batching: a bounded queue per model, a batching task, a compute
//!    thread. It knows nothing of HTTP or of the model (it is given a compute function).
//!    [`stream`] — the command line's counterpart for many files: walked folders, preprocessed
//!    a chunk ahead on worker threads, in input order, with flat memory; [`eval`] — labelled
//!    image sets (ImageFolder, ImageNet's ground-truth CSV) and top-1 / top-5 counts.
//! 7. [`server`] — the HTTP API over all of it.
//!
//! The `diracnet` binary (`src/main.rs`, one file per subcommand in `src/cmd/`) is the
//! command-line edge on top.

pub mod batcher;
pub mod classifier;
pub mod device;
pub mod eval;
pub mod hub;
pub mod memory;
pub mod model;
pub mod npy;
pub mod panic;
pub mod prediction;
pub mod preprocess;
pub mod priority;
pub mod registry;
pub mod server;
pub mod stream;
pub mod tensor;
pub mod weights;
