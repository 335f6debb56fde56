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
//! The architecture (number of groups, blocks per group, widths, classes) is read from the tensor
//! names and shapes, so any folded DiracNet loads, and every mismatch is an error naming the key.

pub mod cpu;

use std::{collections::BTreeMap, path::Path};

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, Linear};

/// Side of the square input image.
pub const INPUT_SIZE: usize = 224;

/// Errors building or running the model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A tensor the architecture needs is absent.
    #[error("missing tensor {key}")]
    MissingKey {
        /// Tensor name.
        key: String,
    },
    /// A tensor that has no place in a DiracNet.
    #[error("unexpected tensor {key} (not part of a folded DiracNet)")]
    ExtraKey {
        /// Tensor name.
        key: String,
    },
    /// A tensor has the wrong shape.
    #[error("tensor {key} has shape {found:?}, expected {expected:?}")]
    Shape {
        /// Tensor name.
        key: String,
        /// Its shape.
        found: Vec<usize>,
        /// The shape the chain needs there.
        expected: Vec<usize>,
    },
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
    Candle(#[from] candle_core::Error),
}

/// The shape of a DiracNet: widths and blocks per group, and the class count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Architecture {
    /// Output channels of the stem conv.
    pub stem_width: usize,
    /// Output channels of each group's convs.
    pub widths: Vec<usize>,
    /// Number of ReLU+conv blocks in each group.
    pub blocks: Vec<usize>,
    /// Number of classes (rows of `fc.weight`).
    pub classes: usize,
}

impl Architecture {
    /// Depth as the paper counts it: stem conv + every block conv + fc (DiracNet-18: 1+16+1).
    pub fn depth(&self) -> usize {
        2 + self.blocks.iter().sum::<usize>()
    }

    /// Every tensor a folded DiracNet of this shape has, with its shape.
    pub fn expected_tensors(&self) -> BTreeMap<String, Vec<usize>> {
        let mut m = BTreeMap::new();
        m.insert(
            "features.conv.weight".into(),
            vec![self.stem_width, 3, 7, 7],
        );
        m.insert("features.conv.bias".into(), vec![self.stem_width]);
        let mut c_in = self.stem_width;
        for (g, (&w, &n)) in self.widths.iter().zip(&self.blocks).enumerate() {
            for b in 0..n {
                let base = format!("features.group{g}.block{b}.conv");
                m.insert(format!("{base}.weight"), vec![w, c_in, 3, 3]);
                m.insert(format!("{base}.bias"), vec![w]);
                c_in = w;
            }
        }
        m.insert("fc.weight".into(), vec![self.classes, c_in]);
        m.insert("fc.bias".into(), vec![self.classes]);
        m
    }

    /// The published ImageNet shapes: DiracNet-18 (4 blocks per group) or DiracNet-34
    /// (6, 8, 12, 6), widths 64–512.
    pub fn imagenet(depth: usize, classes: usize) -> Option<Self> {
        let blocks = match depth {
            18 => vec![4, 4, 4, 4],
            34 => vec![6, 8, 12, 6],
            _ => return None,
        };
        Some(Self {
            stem_width: 64,
            widths: vec![64, 128, 256, 512],
            blocks,
            classes,
        })
    }

    /// Deterministic random weights of this shape (uniform, He-scaled): for benchmarks and tests,
    /// where speed does not depend on the values.
    pub fn random_weights(&self, seed: u64) -> BTreeMap<String, crate::weights::pth::HostTensor> {
        let mut state = seed | 1;
        let mut next = move || {
            // xorshift64: cheap and reproducible.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        self.expected_tensors()
            .into_iter()
            .map(|(name, shape)| {
                let fan_in = shape[1..].iter().product::<usize>().max(1);
                let scale = (12.0 / fan_in as f32).sqrt();
                let data = (0..shape.iter().product::<usize>())
                    .map(|_| next() * scale)
                    .collect();
                (name, crate::weights::pth::HostTensor { shape, data })
            })
            .collect()
    }

    /// Infers the architecture from folded tensor names and shapes, and checks that every
    /// tensor is there with the right shape and nothing else is.
    pub fn from_shapes(shapes: &BTreeMap<String, Vec<usize>>) -> Result<Self, ModelError> {
        let shape_of = |key: &str| {
            shapes.get(key).ok_or_else(|| ModelError::MissingKey {
                key: key.to_string(),
            })
        };
        let stem = shape_of("features.conv.weight")?;
        let fc = shape_of("fc.weight")?;
        // Blocks per group from the names `features.group{g}.block{b}.conv.weight`.
        let mut counts: BTreeMap<usize, usize> = BTreeMap::new();
        for key in shapes.keys() {
            let Some(rest) = key.strip_prefix("features.group") else {
                continue;
            };
            let parsed = rest.split_once(".block").and_then(|(g, r)| {
                let (b, tail) = r.split_once('.')?;
                Some((g.parse::<usize>().ok()?, b.parse::<usize>().ok()?, tail))
            });
            match parsed {
                Some((g, b, "conv.weight" | "conv.bias")) => {
                    let c = counts.entry(g).or_default();
                    *c = (*c).max(b + 1);
                }
                _ => return Err(ModelError::ExtraKey { key: key.clone() }),
            }
        }
        let groups = counts.keys().next_back().map_or(0, |g| g + 1);
        if groups == 0 {
            return Err(ModelError::MissingKey {
                key: "features.group0.block0.conv.weight".into(),
            });
        }
        let mut widths = Vec::with_capacity(groups);
        let mut blocks = Vec::with_capacity(groups);
        for g in 0..groups {
            let n = counts.get(&g).copied().unwrap_or(0);
            let key = format!("features.group{g}.block0.conv.weight");
            let w = shape_of(&key)?;
            widths.push(w.first().copied().unwrap_or(0));
            blocks.push(n);
        }
        let arch = Self {
            stem_width: stem.first().copied().unwrap_or(0),
            widths,
            blocks,
            classes: fc.first().copied().unwrap_or(0),
        };
        let expected = arch.expected_tensors();
        for (key, want) in &expected {
            let found = shape_of(key)?;
            if found != want {
                return Err(ModelError::Shape {
                    key: key.clone(),
                    found: found.clone(),
                    expected: want.clone(),
                });
            }
        }
        if let Some(key) = shapes.keys().find(|k| !expected.contains_key(*k)) {
            return Err(ModelError::ExtraKey { key: key.clone() });
        }
        Ok(arch)
    }
}

/// How the convolutions run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ConvImpl {
    /// `fast` on the CPU, `candle` on CUDA.
    #[default]
    Auto,
    /// The fast CPU path ([`cpu`]): NHWC, packed weights, Winograd 3×3, fused bias+ReLU.
    Fast,
    /// candle's own `conv2d` (NCHW), on any device.
    Candle,
}

impl std::str::FromStr for ConvImpl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "fast" => Ok(Self::Fast),
            "candle" => Ok(Self::Candle),
            _ => Err(format!(
                "invalid conv impl {s:?}: expected auto, fast or candle"
            )),
        }
    }
}

impl std::fmt::Display for ConvImpl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Fast => "fast",
            Self::Candle => "candle",
        })
    }
}

/// Floating-point type of weights and activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// f16 on CUDA, f32 on the CPU.
    #[default]
    Auto,
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    Bf16,
}

impl std::str::FromStr for Precision {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "f32" | "fp32" | "float32" => Ok(Self::F32),
            "f16" | "fp16" | "float16" | "half" => Ok(Self::F16),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            _ => Err(format!(
                "invalid dtype {s:?}: expected auto, f32, f16 or bf16"
            )),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
        })
    }
}

/// Where and how a network runs: device, convolution implementation, dtype (all resolved).
#[derive(Debug, Clone)]
pub struct Backend {
    device: Device,
    conv: ConvImpl,
    dtype: DType,
}

impl Backend {
    /// Resolves `auto` choices for `device` and refuses combinations that cannot run: the fast
    /// path is CPU-only and f32.
    pub fn new(device: Device, conv: ConvImpl, precision: Precision) -> Result<Self, ModelError> {
        let cuda = device.is_cuda();
        let dtype = match precision {
            Precision::Auto if cuda => DType::F16,
            Precision::Auto | Precision::F32 => DType::F32,
            Precision::F16 => DType::F16,
            Precision::Bf16 => DType::BF16,
        };
        if dtype == DType::BF16 && !cuda {
            // candle's CPU matmul has no bf16 kernel.
            return Err(ModelError::Backend(
                "--dtype bf16 needs a CUDA device; use f32 (or f16) on the CPU".into(),
            ));
        }
        let conv = match conv {
            ConvImpl::Auto if device.is_cpu() && dtype == DType::F32 => ConvImpl::Fast,
            ConvImpl::Auto => ConvImpl::Candle,
            ConvImpl::Fast if !device.is_cpu() => {
                return Err(ModelError::Backend(
                    "--conv-impl fast runs on the CPU only; use candle (or auto) on a GPU".into(),
                ));
            }
            ConvImpl::Fast if dtype != DType::F32 => {
                return Err(ModelError::Backend(format!(
                    "--conv-impl fast computes in f32; --dtype {precision} needs --conv-impl candle"
                )));
            }
            other => other,
        };
        Ok(Self {
            device,
            conv,
            dtype,
        })
    }

    /// The CPU, fast path, f32: the default for tests and tools.
    pub fn cpu() -> Self {
        Self {
            device: Device::Cpu,
            conv: ConvImpl::Fast,
            dtype: DType::F32,
        }
    }

    /// The device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The convolution implementation (never `Auto`).
    pub fn conv(&self) -> ConvImpl {
        self.conv
    }

    /// The compute dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// `f32`, `f16` or `bf16`.
    pub fn dtype_name(&self) -> &'static str {
        self.dtype.as_str()
    }

    /// The convolution implementation in words, e.g. `fast (winograd f4x4, avx2+fma)`.
    pub fn conv_description(&self) -> String {
        match self.conv {
            ConvImpl::Fast => format!("fast (winograd f4x4, {})", cpu::isa().name()),
            other => other.to_string(),
        }
    }
}

/// One ReLU → conv 3×3 pad 1 block (candle path).
#[derive(Debug, Clone)]
struct Block {
    conv: Conv2d,
}

impl Block {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.conv.forward(&x.relu()?)
    }
}

/// The convolutional part, in one of the two implementations.
#[derive(Debug, Clone)]
enum Features {
    /// candle's `conv2d`, NCHW, on any device.
    Candle {
        stem: Conv2d,
        groups: Vec<Vec<Block>>,
    },
    /// The fast CPU ops, NHWC; each conv applies the ReLU that follows it.
    Fast {
        stem: cpu::Im2colConv,
        groups: Vec<Vec<cpu::WinogradConv>>,
    },
}

impl Features {
    /// Features after the final ReLU and average: `[N, channels]`.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Candle { stem, groups } => {
                let x = stem.forward(x)?;
                // maxpool 3/2 pad 1. candle's pool has no padding; every group starts with a
                // ReLU, so ReLU-then-zero-pad gives exactly relu(maxpool_{-inf pad}(x)), and the
                // group's own leading ReLU is then a no-op.
                let mut x = x
                    .relu()?
                    .pad_with_zeros(2, 1, 1)?
                    .pad_with_zeros(3, 1, 1)?
                    .max_pool2d_with_stride(3, 2)?;
                let last = groups.len().saturating_sub(1);
                for (g, blocks) in groups.iter().enumerate() {
                    for block in blocks {
                        x = block.forward(&x)?;
                    }
                    if g != last {
                        x = x.max_pool2d(2)?;
                    }
                }
                x.relu()?.mean((2, 3))
            }
            Self::Fast { stem, groups } => {
                let pool = |kernel, stride, pad| cpu::MaxPool {
                    kernel,
                    stride,
                    pad,
                };
                let mut x = x
                    .contiguous()?
                    .apply_op1_no_bwd(stem)?
                    .apply_op1_no_bwd(&pool(3, 2, 1))?;
                let last = groups.len().saturating_sub(1);
                for (g, convs) in groups.iter().enumerate() {
                    for conv in convs {
                        x = x.apply_op1_no_bwd(conv)?;
                    }
                    if g != last {
                        x = x.apply_op1_no_bwd(&pool(2, 2, 0))?;
                    }
                }
                // NHWC, already ReLU'd by the last conv.
                x.mean((1, 2))
            }
        }
    }
}

/// A folded DiracNet ready to run.
#[derive(Debug, Clone)]
pub struct DiracNet {
    arch: Architecture,
    features: Features,
    fc: Linear,
    backend: Backend,
}

impl DiracNet {
    /// Builds the chain from folded tensors (canonical names), validating names and shapes.
    pub fn from_tensors(
        tensors: &BTreeMap<String, Tensor>,
        backend: &Backend,
    ) -> Result<Self, ModelError> {
        let shapes = tensors
            .iter()
            .map(|(k, t)| (k.clone(), t.dims().to_vec()))
            .collect();
        let arch = Architecture::from_shapes(&shapes)?;
        let host = |key: &str| -> Result<Tensor, ModelError> {
            let t = tensors.get(key).ok_or_else(|| ModelError::MissingKey {
                key: key.to_string(),
            })?;
            if !t.dtype().is_float() {
                return Err(ModelError::DType {
                    key: key.to_string(),
                    dtype: format!("{:?}", t.dtype()),
                });
            }
            Ok(t.clone())
        };
        let get = |key: &str| -> Result<Tensor, ModelError> {
            Ok(host(key)?
                .to_dtype(backend.dtype)?
                .to_device(&backend.device)?)
        };
        let f32s = |key: &str| -> Result<Vec<f32>, ModelError> {
            Ok(host(key)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
        };
        let block_key = |g: usize, b: usize| format!("features.group{g}.block{b}.conv");
        let features = match backend.conv {
            ConvImpl::Fast => {
                let w = f32s("features.conv.weight")?;
                let b = f32s("features.conv.bias")?;
                let stem = cpu::Im2colConv::new(&w, &b, arch.stem_width, 3, 7, 2, 3);
                let mut c_in = arch.stem_width;
                let mut groups = Vec::with_capacity(arch.blocks.len());
                for (g, (&width, &n)) in arch.widths.iter().zip(&arch.blocks).enumerate() {
                    let mut convs = Vec::with_capacity(n);
                    for b in 0..n {
                        let base = block_key(g, b);
                        let w = f32s(&format!("{base}.weight"))?;
                        let bias = f32s(&format!("{base}.bias"))?;
                        convs.push(cpu::WinogradConv::new(&w, &bias, width, c_in));
                        c_in = width;
                    }
                    groups.push(convs);
                }
                Features::Fast { stem, groups }
            }
            ConvImpl::Candle | ConvImpl::Auto => {
                let conv = |base: &str, padding, stride| -> Result<Conv2d, ModelError> {
                    let cfg = Conv2dConfig {
                        padding,
                        stride,
                        ..Default::default()
                    };
                    Ok(Conv2d::new(
                        get(&format!("{base}.weight"))?,
                        Some(get(&format!("{base}.bias"))?),
                        cfg,
                    ))
                };
                let stem = conv("features.conv", 3, 2)?;
                let groups = arch
                    .blocks
                    .iter()
                    .enumerate()
                    .map(|(g, &n)| {
                        (0..n)
                            .map(|b| {
                                Ok(Block {
                                    conv: conv(&block_key(g, b), 1, 1)?,
                                })
                            })
                            .collect::<Result<Vec<_>, ModelError>>()
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Features::Candle { stem, groups }
            }
        };
        let fc = Linear::new(get("fc.weight")?, Some(get("fc.bias")?));
        Ok(Self {
            arch,
            features,
            fc,
            backend: backend.clone(),
        })
    }

    /// Loads a folded safetensors file (memory-mapped) onto `backend`.
    pub fn load(path: &Path, backend: &Backend) -> Result<Self, ModelError> {
        // SAFETY: the mapping is read-only and dropped before returning (every tensor is copied
        // out). Our cache files are written to a temporary name and renamed into place, never
        // modified in place; a user file changed while we copy it could give wrong values, as with
        // any reader, but not unsoundness in our code.
        let mapped = unsafe { candle_core::safetensors::MmapedSafetensors::new(path) };
        let tensors = mapped
            .and_then(|st| {
                st.tensors()
                    .into_iter()
                    .map(|(name, view)| {
                        Ok((
                            name,
                            candle_core::safetensors::Load::load(&view, &Device::Cpu)?,
                        ))
                    })
                    .collect::<candle_core::Result<BTreeMap<String, Tensor>>>()
            })
            .map_err(|e| ModelError::File {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?;
        Self::from_tensors(&tensors, backend)
    }

    /// The architecture read from the weights.
    pub fn architecture(&self) -> &Architecture {
        &self.arch
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.backend.device
    }

    /// Device, convolution implementation and dtype.
    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// f32 logits `[N, classes]` for a batch `[N, 3, 224, 224]` of normalised images.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor, ModelError> {
        match x.dims() {
            [_, 3, INPUT_SIZE, INPUT_SIZE] => {}
            d => return Err(ModelError::InputShape { found: d.to_vec() }),
        }
        let x = x
            .to_device(&self.backend.device)?
            .to_dtype(self.backend.dtype)?;
        let x = self.features.forward(&x)?;
        Ok(self.fc.forward(&x)?.to_dtype(DType::F32)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arch() -> Architecture {
        Architecture {
            stem_width: 4,
            widths: vec![4, 8, 16, 32],
            blocks: vec![4, 4, 4, 4],
            classes: 10,
        }
    }

    #[test]
    fn architecture_roundtrips_through_shapes() {
        let a = arch();
        assert_eq!(a.depth(), 18);
        let shapes = a.expected_tensors();
        assert_eq!(shapes.len(), 2 + 16 * 2 + 2);
        assert_eq!(
            shapes["features.group1.block0.conv.weight"],
            vec![8, 4, 3, 3]
        );
        assert_eq!(Architecture::from_shapes(&shapes).unwrap(), a);
    }

    #[test]
    fn validation_names_the_key() {
        let mut s = arch().expected_tensors();
        s.remove("features.group2.block1.conv.bias");
        let e = Architecture::from_shapes(&s).unwrap_err().to_string();
        assert_eq!(e, "missing tensor features.group2.block1.conv.bias");

        let mut s = arch().expected_tensors();
        s.insert(
            "features.group1.block1.conv.weight".into(),
            vec![8, 4, 3, 3],
        );
        let e = Architecture::from_shapes(&s).unwrap_err().to_string();
        assert!(
            e.contains("features.group1.block1.conv.weight") && e.contains("[8, 8, 3, 3]"),
            "{e}"
        );

        let mut s = arch().expected_tensors();
        s.insert("features.group0.block0.bn.weight".into(), vec![4]);
        let e = Architecture::from_shapes(&s).unwrap_err().to_string();
        assert!(
            e.contains("unexpected tensor features.group0.block0.bn.weight"),
            "{e}"
        );

        let mut s = arch().expected_tensors();
        s.insert("classifier.weight".into(), vec![4]);
        assert!(Architecture::from_shapes(&s)
            .unwrap_err()
            .to_string()
            .contains("classifier.weight"));
    }

    #[test]
    fn forward_shape_and_input_check() {
        let dev = Device::Cpu;
        let tensors = arch()
            .expected_tensors()
            .into_iter()
            .map(|(k, s)| (k, Tensor::randn(0f32, 0.1, s, &dev).unwrap()))
            .collect();
        let x = Tensor::randn(0f32, 1.0, (2, 3, 224, 224), &dev).unwrap();
        let fast = DiracNet::from_tensors(&tensors, &Backend::cpu()).unwrap();
        let y = fast.forward(&x).unwrap();
        assert_eq!(y.dims(), &[2, 10]);
        // Both implementations give the same logits.
        let candle = Backend::new(dev.clone(), ConvImpl::Candle, Precision::F32).unwrap();
        let net = DiracNet::from_tensors(&tensors, &candle).unwrap();
        let y2 = net.forward(&x).unwrap();
        let scale = max_abs(&y2);
        let diff = max_abs(&(&y - &y2).unwrap());
        assert!(
            diff <= 1e-4 * scale.max(1e-3),
            "fast vs candle: {diff} at {scale}"
        );
        let bad = Tensor::zeros((1, 3, 32, 32), DType::F32, &dev).unwrap();
        assert!(matches!(
            net.forward(&bad),
            Err(ModelError::InputShape { .. })
        ));
    }

    /// max |t| over all elements.
    fn max_abs(t: &Tensor) -> f32 {
        t.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    fn to_tensors(arch: &Architecture, seed: u64) -> BTreeMap<String, Tensor> {
        arch.random_weights(seed)
            .into_iter()
            .map(|(k, t)| (k, Tensor::from_vec(t.data, t.shape, &Device::Cpu).unwrap()))
            .collect()
    }

    #[test]
    fn fast_path_matches_candle_at_full_imagenet_width() {
        // The published DiracNet-18 shape (widths 64–512, 1000 classes): the Winograd error at
        // real channel counts, on one image.
        let arch = Architecture::imagenet(18, 1000).unwrap();
        let tensors = to_tensors(&arch, 7);
        let x = Tensor::randn(0f32, 1.0, (1, 3, 224, 224), &Device::Cpu).unwrap();
        let fast = DiracNet::from_tensors(&tensors, &Backend::cpu()).unwrap();
        let candle = Backend::new(Device::Cpu, ConvImpl::Candle, Precision::F32).unwrap();
        let reference = DiracNet::from_tensors(&tensors, &candle).unwrap();
        let (a, b) = (fast.forward(&x).unwrap(), reference.forward(&x).unwrap());
        let scale = max_abs(&b);
        let diff = max_abs(&(&a - &b).unwrap());
        assert!(scale > 0.0);
        assert!(
            diff <= 1e-4 * scale,
            "max |Δlogit| {diff} at max |logit| {scale}"
        );
    }

    #[test]
    fn backend_resolves_auto_and_refuses_what_cannot_run() {
        let b = Backend::new(Device::Cpu, ConvImpl::Auto, Precision::Auto).unwrap();
        assert_eq!((b.conv(), b.dtype()), (ConvImpl::Fast, DType::F32));
        let b = Backend::new(Device::Cpu, ConvImpl::Auto, Precision::F16).unwrap();
        assert_eq!((b.conv(), b.dtype()), (ConvImpl::Candle, DType::F16));
        let e = Backend::new(Device::Cpu, ConvImpl::Fast, Precision::F16).unwrap_err();
        assert!(e.to_string().contains("--conv-impl candle"), "{e}");
        let e = Backend::new(Device::Cpu, ConvImpl::Candle, Precision::Bf16).unwrap_err();
        assert!(e.to_string().contains("CUDA"), "{e}");
        assert_eq!("FAST".parse::<ConvImpl>(), Ok(ConvImpl::Fast));
        assert!("winograd".parse::<ConvImpl>().is_err());
        assert_eq!("fp16".parse::<Precision>(), Ok(Precision::F16));
        assert!("f64".parse::<Precision>().is_err());
    }

    #[test]
    fn half_precision_runs_on_the_candle_path() {
        let dev = Device::Cpu;
        let tensors = to_tensors(&arch(), 3);
        let x = Tensor::randn(0f32, 1.0, (1, 3, 224, 224), &dev).unwrap();
        let f32net = DiracNet::from_tensors(&tensors, &Backend::cpu()).unwrap();
        let half = Backend::new(dev, ConvImpl::Candle, Precision::F16).unwrap();
        let f16net = DiracNet::from_tensors(&tensors, &half).unwrap();
        let (a, b) = (f32net.forward(&x).unwrap(), f16net.forward(&x).unwrap());
        assert_eq!(b.dtype(), DType::F32, "logits come back as f32");
        let scale = max_abs(&a);
        let diff = max_abs(&(&a - &b).unwrap());
        // f16 keeps 11 bits of mantissa: close, not equal.
        assert!(diff > 0.0 && diff < 0.1 * scale, "{diff} at {scale}");
    }
}
