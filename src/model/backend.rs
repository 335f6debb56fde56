//! Where and how the network runs: the device, the convolution implementation and the numeric
//! type, chosen once per process ([`Backend::new`] resolves `auto` and refuses what cannot run).

use std::fmt;

use candle_core::{DType, Device};
use clap::ValueEnum;

use super::{cpu, ModelError};

/// How the convolutions run (`--conv-impl`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum ConvImpl {
    /// `fast` on the CPU, `candle` on CUDA.
    #[default]
    Auto,
    /// The fast CPU path ([`cpu`]): NHWC, packed weights, fused bias+ReLU; each 3×3 conv
    /// call runs Winograd or the direct conv, whichever is faster for its size.
    Fast,
    /// The fast path with every 3×3 conv as Winograd F(4×4, 3×3) (for tests and benchmarks).
    Winograd,
    /// The fast path with every 3×3 conv direct: im2col + GEMM (for tests and benchmarks).
    Direct,
    /// candle's own `conv2d` (NCHW), on any device.
    Candle,
}

/// Floating-point type of weights and activations (`--dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum Precision {
    /// f16 on CUDA, f32 on the CPU.
    #[default]
    Auto,
    /// 32-bit float.
    #[value(alias = "fp32", alias = "float32")]
    F32,
    /// IEEE half.
    #[value(alias = "fp16", alias = "float16", alias = "half")]
    F16,
    /// bfloat16.
    #[value(alias = "bfloat16")]
    Bf16,
}

/// The name a value has on the command line (`auto`, `fast`, `f32`, ...).
fn write_value_name(value: &impl ValueEnum, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    match value.to_possible_value() {
        Some(v) => f.write_str(v.get_name()),
        None => Ok(()),
    }
}

impl ConvImpl {
    /// True for the fast CPU path, whatever its 3×3 algorithm.
    pub fn is_fast(self) -> bool {
        matches!(self, Self::Fast | Self::Winograd | Self::Direct)
    }
}

impl fmt::Display for ConvImpl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_value_name(self, f)
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_value_name(self, f)
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
    /// path is CPU-only and f32, or bf16 on a CPU with AVX512-BF16.
    pub fn new(device: Device, conv: ConvImpl, precision: Precision) -> Result<Self, ModelError> {
        let cuda = device.is_cuda();
        let dtype = match precision {
            Precision::Auto if cuda => DType::F16,
            Precision::Auto | Precision::F32 => DType::F32,
            Precision::F16 => DType::F16,
            Precision::Bf16 => DType::BF16,
        };
        if dtype == DType::BF16 && device.is_cpu() {
            return Self::cpu_bf16(conv);
        }
        let conv = match conv {
            ConvImpl::Auto if device.is_cpu() && dtype == DType::F32 => ConvImpl::Fast,
            ConvImpl::Auto => ConvImpl::Candle,
            fast if fast.is_fast() && !device.is_cpu() => {
                return Err(ModelError::Backend(format!(
                    "--conv-impl {fast} runs on the CPU only; use candle (or auto) on a GPU"
                )));
            }
            fast if fast.is_fast() && dtype != DType::F32 => {
                return Err(ModelError::Backend(format!(
                    "--conv-impl {fast} computes in f32; --dtype {precision} needs --conv-impl candle"
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

    /// `--dtype bf16` on the CPU: the fast path's convs with bf16 products, where the CPU has
    /// AVX512-BF16 (candle's CPU matmul has no bf16 kernel).
    fn cpu_bf16(conv: ConvImpl) -> Result<Self, ModelError> {
        let conv =
            match conv {
                ConvImpl::Candle => return Err(ModelError::Backend(
                    "--dtype bf16 on the CPU runs on the fast path only (candle's CPU matmul has \
                     no bf16 kernel): use --conv-impl fast, or a CUDA device"
                        .into(),
                )),
                _ if !cpu::bf16::avx512_bf16() => return Err(ModelError::Backend(
                    "--dtype bf16 on the CPU needs AVX512-BF16 (the avx512_bf16 flag in lscpu, \
                     with --cpu-isa auto or avx512), which this CPU lacks or --cpu-isa \
                     excludes; use f32 here, or bf16 on a CUDA device"
                        .into(),
                )),
                ConvImpl::Auto => ConvImpl::Fast,
                fast => fast,
            };
        Ok(Self {
            device: Device::Cpu,
            conv,
            dtype: DType::BF16,
        })
    }

    /// The 3×3 algorithm for layers on `side × side` maps (`None`: candle's conv).
    pub fn conv_algo(&self, side: usize) -> Option<cpu::Algo> {
        let pick = match self.conv {
            ConvImpl::Fast => cpu::Pick::BySize { side },
            ConvImpl::Winograd => cpu::Pick::Winograd,
            ConvImpl::Direct => cpu::Pick::Direct,
            ConvImpl::Auto | ConvImpl::Candle => return None,
        };
        // bf16 runs on the fast path only (`Backend::new`).
        Some(cpu::Algo {
            pick,
            bf16: self.dtype == DType::BF16,
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

    /// The CPU kernel set the fast path runs (`avx512`, `avx2+fma`, `portable`, or
    /// `avx512_bf16` or `amx_bf16` for `--dtype bf16`); `None` when the fast path is not in use
    /// (candle's convolutions, or a GPU).
    pub fn isa(&self) -> Option<&'static str> {
        match (self.conv.is_fast(), self.dtype) {
            (true, DType::BF16) => Some(cpu::bf16::Kernel::detect().name()),
            (true, _) => Some(cpu::isa().name()),
            (false, _) => None,
        }
    }

    /// The convolution implementation in words, e.g. `fast (winograd f4x4 + direct, avx512)`
    /// or `fast (winograd f4x4, avx2+fma)`.
    pub fn conv_description(&self) -> String {
        let isa = self.isa().unwrap_or_default();
        let bf16 = self.dtype == DType::BF16;
        let products = if bf16 {
            "bf16 products, f32 sums, "
        } else {
            ""
        };
        // The same rule as the layers' (cpu::Conv3x3::new): in bf16 on AMX, direct alone.
        let direct_only = bf16 && cpu::bf16_direct_only();
        match self.conv {
            ConvImpl::Fast if direct_only => format!("fast (direct only, {products}{isa})"),
            // The f32 direct conv takes calls only with the AVX-512 kernels (cpu::Conv3x3).
            ConvImpl::Fast if bf16 || cpu::isa() == cpu::Isa::Avx512 => {
                format!("fast (winograd f4x4 + direct, {products}{isa})")
            }
            ConvImpl::Fast => format!("fast (winograd f4x4, {isa})"),
            ConvImpl::Winograd => format!("winograd (fast path, f4x4 only, {products}{isa})"),
            ConvImpl::Direct => {
                format!("direct (fast path, im2col + gemm only, {products}{isa})")
            }
            other => other.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_resolves_auto_and_refuses_what_cannot_run() {
        let b = Backend::new(Device::Cpu, ConvImpl::Auto, Precision::Auto).unwrap();
        assert_eq!((b.conv(), b.dtype()), (ConvImpl::Fast, DType::F32));
        let b = Backend::new(Device::Cpu, ConvImpl::Auto, Precision::F16).unwrap();
        assert_eq!((b.conv(), b.dtype()), (ConvImpl::Candle, DType::F16));
        let e = Backend::new(Device::Cpu, ConvImpl::Fast, Precision::F16).unwrap_err();
        assert!(e.to_string().contains("--conv-impl candle"), "{e}");
        let e = Backend::new(Device::Cpu, ConvImpl::Candle, Precision::Bf16).unwrap_err();
        assert!(e.to_string().contains("--conv-impl fast"), "{e}");
        // bf16 on the CPU: the fast path where AVX512-BF16 runs, else an error naming it.
        match Backend::new(Device::Cpu, ConvImpl::Auto, Precision::Bf16) {
            Ok(b) => {
                assert!(cpu::bf16::avx512_bf16());
                assert_eq!((b.conv(), b.dtype()), (ConvImpl::Fast, DType::BF16));
                let kernel = cpu::bf16::Kernel::detect();
                assert!(kernel >= cpu::bf16::Kernel::Avx512);
                assert_eq!(b.isa(), Some(kernel.name()));
                let algo = cpu::Algo {
                    pick: cpu::Pick::BySize { side: 7 },
                    bf16: true,
                };
                assert_eq!(b.conv_algo(7), Some(algo));
                let b = Backend::new(Device::Cpu, ConvImpl::Winograd, Precision::Bf16).unwrap();
                assert_eq!(
                    b.conv_algo(7).map(|a| (a.pick, a.bf16)),
                    Some((cpu::Pick::Winograd, true))
                );
            }
            Err(e) => {
                assert!(!cpu::bf16::avx512_bf16());
                assert!(e.to_string().contains("avx512_bf16"), "{e}");
            }
        }
    }

    #[test]
    fn command_line_names_parse_and_print() {
        assert_eq!(ConvImpl::from_str("FAST", true), Ok(ConvImpl::Fast));
        assert_eq!(ConvImpl::from_str("Direct", true), Ok(ConvImpl::Direct));
        assert!(ConvImpl::from_str("im2col", true).is_err());
        assert_eq!(Precision::from_str("fp16", true), Ok(Precision::F16));
        assert_eq!(Precision::from_str("bfloat16", true), Ok(Precision::Bf16));
        assert!(Precision::from_str("f64", true).is_err());
        assert_eq!(ConvImpl::Candle.to_string(), "candle");
        assert_eq!(Precision::Bf16.to_string(), "bf16");
        assert_eq!(Precision::Auto.to_string(), "auto");
    }
}
