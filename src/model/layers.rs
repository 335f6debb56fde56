//! The layers of the folded chain, one struct each, with `load` (its weights from a
//! [`VarBuilder`] at its prefix) and `forward`, as candle-transformers writes its models.
//!
//! Every layer comes in the two implementations of [`ConvImpl`]:
//!
//! * **candle**: candle's `conv2d` and pooling, NCHW, any device and dtype. Each block is
//!   ReLU → conv, as PyTorch runs it.
//! * **fast** ([`cpu`]): the CPU custom ops, NHWC (channels innermost) from the stem to the head.
//!   Every conv's output goes through a ReLU before anything else reads it (the next block's
//!   leading ReLU, or the head's; max-pooling commutes with ReLU), so each conv applies that
//!   ReLU itself, fused with its bias, and a block is conv → ReLU.
//!
//! Both give the same chain: conv 7×7/2 → maxpool 3/2 → [ReLU → conv 3×3] × blocks, maxpool 2
//! between groups → ReLU → average → linear.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, Linear, VarBuilder};

use super::{cpu, profile, Backend, ConvImpl};

/// The weights of a conv at `vb` (`weight` `[c_out, c_in, k, k]`, `bias` `[c_out]`) as f32
/// host values, for the fast ops to pack.
fn host_conv(vb: &VarBuilder, c_out: usize, c_in: usize, k: usize) -> Result<(Vec<f32>, Vec<f32>)> {
    let host = |t: Tensor| t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>();
    let weight = vb.get((c_out, c_in, k, k), "weight")?;
    let bias = vb.get(c_out, "bias")?;
    Ok((host(weight)?, host(bias)?))
}

/// A conv with candle's `conv2d`, square kernel.
fn candle_conv(
    vb: VarBuilder,
    c_in: usize,
    c_out: usize,
    k: usize,
    stride: usize,
    padding: usize,
) -> Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding,
        stride,
        ..Default::default()
    };
    candle_nn::conv2d(c_in, c_out, k, cfg, vb)
}

/// conv 7×7/2 pad 3 (+bias) → ReLU → maxpool 3/2 pad 1 (`features.conv`). Its output is
/// ReLU'd.
#[derive(Debug, Clone)]
pub enum Stem {
    /// NCHW in, NCHW out.
    Candle(Conv2d),
    /// NCHW in (the network input), NHWC out; the pool fused into the conv.
    Fast(cpu::Im2colConv),
}

impl Stem {
    /// Loads `weight` and `bias` at `vb` for `width` output channels.
    pub fn load(vb: VarBuilder, width: usize, conv: ConvImpl) -> Result<Self> {
        Ok(if conv.is_fast() {
            let (w, b) = host_conv(&vb, width, 3, 7)?;
            Self::Fast(
                cpu::Im2colConv::new(&w, &b, width, 3, 7, 2, 3).with_pool(cpu::MaxPool {
                    kernel: 3,
                    stride: 2,
                    pad: 1,
                }),
            )
        } else {
            Self::Candle(candle_conv(vb, 3, width, 7, 2, 3)?)
        })
    }

    /// `[N, 3, 224, 224]` → `[N, width, 56, 56]` (candle) or `[N, 56, 56, width]` (fast).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        profile::time(
            || format!("stem conv7x7+maxpool {:?}", x.dims()),
            || self.run(x),
        )
    }

    fn run(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            // candle's pool has no padding. ReLU-then-zero-pad gives exactly
            // relu(maxpool_{-inf pad}(x)), which is what the next block reads.
            Self::Candle(conv) => conv
                .forward(x)?
                .relu()?
                .pad_with_zeros(2, 1, 1)?
                .pad_with_zeros(3, 1, 1)?
                .max_pool2d_with_stride(3, 2),
            Self::Fast(conv) => x.contiguous()?.apply_op1_no_bwd(conv),
        }
    }
}

/// ReLU → conv 3×3 pad 1 (+bias) (`features.group{g}.block{b}.conv`); the fast path runs it as
/// conv → ReLU (see the module docs).
#[derive(Debug, Clone)]
pub enum Block {
    /// candle's conv, NCHW.
    Candle(Conv2d),
    /// Winograd F(4×4, 3×3), direct, or direct in bf16, NHWC, bias and ReLU fused (boxed: it
    /// holds up to three weight layouts).
    Fast(Box<cpu::Conv3x3>),
}

impl Block {
    /// Loads `weight` and `bias` at `vb`: `c_in` → `width` channels, computed by `algo` (the
    /// fast path's 3×3 algorithm; `None`: candle's conv).
    pub fn load(
        vb: VarBuilder,
        c_in: usize,
        width: usize,
        algo: Option<cpu::Algo>,
    ) -> Result<Self> {
        Ok(match algo {
            Some(algo) => {
                let (w, b) = host_conv(&vb, width, c_in, 3)?;
                Self::Fast(Box::new(cpu::Conv3x3::new(&w, &b, width, c_in, algo)))
            }
            None => Self::Candle(candle_conv(vb, c_in, width, 3, 1, 1)?),
        })
    }

    /// Same spatial size in, same out.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let name = || {
            let algorithms = match self {
                Self::Candle(_) => "candle",
                Self::Fast(conv) => conv.algorithms(),
            };
            format!("conv3x3 {:?} {algorithms}", x.dims())
        };
        profile::time(name, || match self {
            Self::Candle(conv) => conv.forward(&x.relu()?),
            Self::Fast(conv) => x.apply_op1_no_bwd(conv.as_ref()),
        })
    }
}

/// The blocks of one group (`features.group{g}`), then a 2×2 max-pool unless it is the last
/// group.
#[derive(Debug, Clone)]
pub struct Group {
    blocks: Vec<Block>,
    pool: bool,
    conv: ConvImpl,
}

impl Group {
    /// Loads `blocks` blocks at `vb` (`block0`, `block1`, ...): `c_in` → `width` channels, on
    /// `side × side` maps, as `backend` computes them.
    pub fn load(
        vb: VarBuilder,
        c_in: usize,
        width: usize,
        blocks: usize,
        side: usize,
        last: bool,
        backend: &Backend,
    ) -> Result<Self> {
        let algo = backend.conv_algo(side);
        let blocks = (0..blocks)
            .map(|b| {
                let c_in = if b == 0 { c_in } else { width };
                Block::load(vb.pp(format!("block{b}")).pp("conv"), c_in, width, algo)
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            blocks,
            pool: !last,
            conv: backend.conv(),
        })
    }

    /// Halves the spatial size unless this is the last group. Takes the input by value so
    /// that it is freed as soon as the first block has read it: the caller's copy would keep
    /// a third activation alive (25.7 MB at batch 32).
    pub fn forward(&self, x: Tensor) -> Result<Tensor> {
        let mut x = x;
        for block in &self.blocks {
            x = block.forward(&x)?;
        }
        if !self.pool {
            return Ok(x);
        }
        profile::time(
            || format!("maxpool2 {:?}", x.dims()),
            || {
                if self.conv.is_fast() {
                    x.apply_op1_no_bwd(&cpu::MaxPool {
                        kernel: 2,
                        stride: 2,
                        pad: 0,
                    })
                } else {
                    x.max_pool2d(2)
                }
            },
        )
    }
}

/// ReLU → average over the whole map → linear (`fc`).
#[derive(Debug, Clone)]
pub struct Head {
    fc: Linear,
    conv: ConvImpl,
}

impl Head {
    /// Loads `fc.weight` `[classes, channels]` and `fc.bias` at `vb`.
    pub fn load(vb: VarBuilder, channels: usize, classes: usize, conv: ConvImpl) -> Result<Self> {
        Ok(Self {
            fc: candle_nn::linear(channels, classes, vb)?,
            conv,
        })
    }

    /// The embedding: `[N, channels]`, the last ReLU's output averaged over the map (the
    /// classifier's input).
    pub fn pool(&self, x: &Tensor) -> Result<Tensor> {
        profile::time(
            || format!("avgpool {:?}", x.dims()),
            || {
                if self.conv.is_fast() {
                    // NHWC, already ReLU'd by the last conv.
                    x.contiguous()?.apply_op1_no_bwd(&cpu::GlobalAvgPool)
                } else {
                    x.relu()?.mean((2, 3))
                }
            },
        )
    }

    /// `[N, classes]` logits of pooled features.
    pub fn classify(&self, pooled: &Tensor) -> Result<Tensor> {
        profile::time(
            || format!("fc {:?}", pooled.dims()),
            || self.fc.forward(pooled),
        )
    }
}
