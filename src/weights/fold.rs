//! Recognising checkpoint layouts and folding training checkpoints into plain convolutions.
//!
//! Two layouts are DiracNets:
//!
//! * **folded** — what the authors published: `features.conv.{weight,bias}`,
//!   `features.group{g}.block{b}.conv.{weight,bias}`, `fc.{weight,bias}` (the export notebook's
//!   names without `features.` are accepted too);
//! * **unfolded** — what the seed's `train.py` saves: `{'params': {...}, 'stats': {...}, ...}`
//!   with the Dirac parameterisation (`conv`, `alpha`, `beta`) and batch-norm kept apart.
//!
//! Folding follows the seed's export notebook: for each block
//! `ŵ = β·normalize(w) + α·δ` (`normalize` scales each output filter to unit L2 norm, `δ` is the
//! Dirac delta), then batch-norm (ε = 1e-5) goes into weight and bias:
//! `a = γ / √(var + ε)`, `weight = a·ŵ`, `bias = β_bn − mean·a`. The stem conv folds only its
//! batch-norm. Arithmetic is done in f64 and rounded once to f32.

use std::collections::BTreeMap;

use crate::tensor::HostTensor;

/// Batch-norm epsilon used by the seed (PyTorch's default).
pub const BN_EPS: f64 = 1e-5;

/// Errors recognising or folding a checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum FoldError {
    /// The tensors are not a DiracNet in either layout.
    #[error("not a DiracNet checkpoint: expected folded keys (features.conv.weight, features.group0.block0.conv.weight, fc.weight, ...) or an unfolded training checkpoint (params.conv, params.group0.block0.alpha, stats.bn.running_mean, ...); found {count} tensors: {sample}")]
    Unrecognised {
        /// Number of tensors found.
        count: usize,
        /// The first few names with shapes.
        sample: String,
    },
    /// A tensor the layout needs is absent.
    #[error("unfolded checkpoint lacks tensor {key}")]
    Missing {
        /// Full tensor name in the file.
        key: String,
    },
    /// A tensor has the wrong shape for its role.
    #[error("tensor {key} has shape {found:?}, expected {expected}")]
    Shape {
        /// Full tensor name in the file.
        key: String,
        /// Its shape.
        found: Vec<usize>,
        /// What was expected, in words.
        expected: String,
    },
}

/// A recognised checkpoint layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// Folded weights. `prefix` precedes every name (e.g. `state_dict.`); `features` says whether
    /// the conv names carry the `features.` part.
    Folded {
        /// Common prefix of all tensor names.
        prefix: String,
        /// Whether conv names start with `features.`.
        features: bool,
    },
    /// A training checkpoint; names are `{prefix}params.*` and `{prefix}stats.*`.
    Unfolded {
        /// Common prefix of all tensor names.
        prefix: String,
    },
}

impl Layout {
    /// `"folded"` or `"unfolded"`.
    pub fn kind(&self) -> &'static str {
        match self {
            Layout::Folded { .. } => "folded",
            Layout::Unfolded { .. } => "unfolded",
        }
    }
}

/// Recognises the layout from tensor names.
pub fn detect(shapes: &BTreeMap<String, Vec<usize>>) -> Result<Layout, FoldError> {
    let has = |k: &str| shapes.contains_key(k);
    for key in shapes.keys() {
        if let Some(prefix) = key.strip_suffix("features.conv.weight") {
            if has(&format!("{prefix}fc.weight")) {
                return Ok(Layout::Folded {
                    prefix: prefix.to_string(),
                    features: true,
                });
            }
        }
        if let Some(prefix) = key.strip_suffix("params.conv") {
            if has(&format!("{prefix}stats.bn.running_mean")) {
                return Ok(Layout::Unfolded {
                    prefix: prefix.to_string(),
                });
            }
        }
        if let Some(prefix) = key.strip_suffix("group0.block0.conv.weight") {
            if has(&format!("{prefix}conv.weight")) && has(&format!("{prefix}fc.weight")) {
                return Ok(Layout::Folded {
                    prefix: prefix.to_string(),
                    features: false,
                });
            }
        }
    }
    let sample: Vec<String> = shapes
        .iter()
        .take(6)
        .map(|(k, s)| format!("{k} {s:?}"))
        .collect();
    let more = if shapes.len() > 6 { ", ..." } else { "" };
    Err(FoldError::Unrecognised {
        count: shapes.len(),
        sample: format!("{}{more}", sample.join(", ")),
    })
}

/// Names of the checkpoint's tensors to read for `layout`: every name under its prefix, as the
/// file spells it ([`to_folded`] renames a folded layout's to the canonical `features.*` /
/// `fc.*` form; the architecture check validates them later).
pub fn checkpoint_names(layout: &Layout, shapes: &BTreeMap<String, Vec<usize>>) -> Vec<String> {
    let prefix = match layout {
        Layout::Folded { prefix, .. } | Layout::Unfolded { prefix } => prefix,
    };
    shapes
        .keys()
        .filter(|k| k.starts_with(prefix.as_str()))
        .cloned()
        .collect()
}

/// Turns the tensors of a recognised checkpoint into the folded, canonically named map.
///
/// `read` fetches one tensor by its name in the file.
pub fn to_folded<E>(
    layout: &Layout,
    shapes: &BTreeMap<String, Vec<usize>>,
    mut read: impl FnMut(&str) -> Result<HostTensor, E>,
) -> Result<BTreeMap<String, HostTensor>, FoldOrRead<E>> {
    match layout {
        Layout::Folded { prefix, features } => {
            let mut out = BTreeMap::new();
            for key in checkpoint_names(layout, shapes) {
                let short = &key[prefix.len()..];
                let name = if *features || short.starts_with("fc.") {
                    short.to_string()
                } else {
                    format!("features.{short}")
                };
                out.insert(name, read(&key).map_err(FoldOrRead::Read)?);
            }
            Ok(out)
        }
        Layout::Unfolded { prefix } => fold_unfolded(prefix, shapes, read),
    }
}

/// Either a folding error or the reader's error.
#[derive(Debug, thiserror::Error)]
pub enum FoldOrRead<E> {
    /// The layout is wrong.
    #[error(transparent)]
    Fold(#[from] FoldError),
    /// A tensor could not be read.
    #[error(transparent)]
    Read(E),
}

fn fold_unfolded<E>(
    prefix: &str,
    shapes: &BTreeMap<String, Vec<usize>>,
    mut read: impl FnMut(&str) -> Result<HostTensor, E>,
) -> Result<BTreeMap<String, HostTensor>, FoldOrRead<E>> {
    let p = |k: &str| format!("{prefix}params.{k}");
    let s = |k: &str| format!("{prefix}stats.{k}");
    let mut get = |key: String| -> Result<HostTensor, FoldOrRead<E>> {
        if !shapes.contains_key(&key) {
            return Err(FoldError::Missing { key }.into());
        }
        read(&key).map_err(FoldOrRead::Read)
    };
    let mut out = BTreeMap::new();

    // Stem: conv (no bias) + batch-norm.
    let conv = get(p("conv"))?;
    let bn = BatchNorm {
        weight: get(p("bn.weight"))?,
        bias: get(p("bn.bias"))?,
        mean: get(s("bn.running_mean"))?,
        var: get(s("bn.running_var"))?,
    };
    let (w, b) = bn.fold(&p("conv"), conv.clone(), &conv.data)?;
    out.insert("features.conv.weight".into(), w);
    out.insert("features.conv.bias".into(), b);

    // Blocks, in whatever number the file has.
    let block_prefix = format!("{prefix}params.");
    for key in shapes.keys() {
        let Some(base) = key
            .strip_prefix(&block_prefix)
            .and_then(|k| k.strip_suffix(".conv"))
        else {
            continue;
        };
        if !base.starts_with("group") || !base.contains(".block") {
            continue;
        }
        let conv = get(key.clone())?;
        if conv.shape.len() != 4 {
            return Err(FoldError::Shape {
                key: key.clone(),
                found: conv.shape.clone(),
                expected: "[out, in, kh, kw]".into(),
            }
            .into());
        }
        let out_ch = conv.shape[0];
        let alpha = get(p(&format!("{base}.alpha")))?;
        let beta = get(p(&format!("{base}.beta")))?;
        let delta_name = s(&format!(
            "eye{}",
            conv.shape
                .iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join("_")
        ));
        let delta = if shapes.contains_key(&delta_name) {
            get(delta_name)?
        } else {
            dirac(&conv.shape)
        };
        for (name, t) in [("alpha", &alpha), ("beta", &beta)] {
            if t.numel() != 1 && t.numel() != out_ch {
                return Err(FoldError::Shape {
                    key: p(&format!("{base}.{name}")),
                    found: t.shape.clone(),
                    expected: format!("1 or {out_ch} values"),
                }
                .into());
            }
        }
        if delta.shape != conv.shape {
            return Err(FoldError::Shape {
                key: s(&format!("eye{:?}", conv.shape)),
                found: delta.shape.clone(),
                expected: format!("{:?}", conv.shape),
            }
            .into());
        }
        let w_hat = dirac_weight(&conv, &alpha.data, &beta.data, &delta.data);
        let bn = BatchNorm {
            weight: get(p(&format!("{base}.bn.weight")))?,
            bias: get(p(&format!("{base}.bn.bias")))?,
            mean: get(s(&format!("{base}.bn.running_mean")))?,
            var: get(s(&format!("{base}.bn.running_var")))?,
        };
        let (w, b) = bn.fold(key, conv, &w_hat)?;
        out.insert(format!("features.{base}.conv.weight"), w);
        out.insert(format!("features.{base}.conv.bias"), b);
    }

    out.insert("fc.weight".into(), get(p("fc.weight"))?);
    out.insert("fc.bias".into(), get(p("fc.bias"))?);
    Ok(out)
}

/// `ŵ = β·normalize(w) + α·δ`, per output filter, in f64.
fn dirac_weight(conv: &HostTensor, alpha: &[f32], beta: &[f32], delta: &[f32]) -> Vec<f64> {
    let out_ch = conv.shape[0];
    let per = conv.numel() / out_ch.max(1);
    let pick = |v: &[f32], o: usize| f64::from(if v.len() == 1 { v[0] } else { v[o] });
    let mut w_hat = Vec::with_capacity(conv.numel());
    for o in 0..out_ch {
        let filter = &conv.data[o * per..(o + 1) * per];
        let norm = filter
            .iter()
            .map(|&x| f64::from(x) * f64::from(x))
            .sum::<f64>()
            .sqrt();
        // F.normalize divides by max(norm, 1e-12).
        let denom = norm.max(1e-12);
        let (a, b) = (pick(alpha, o), pick(beta, o));
        for (x, d) in filter.iter().zip(&delta[o * per..(o + 1) * per]) {
            w_hat.push(b * f64::from(*x) / denom + a * f64::from(*d));
        }
    }
    w_hat
}

/// The Dirac delta `torch.nn.init.dirac_` makes: 1 at the kernel centre of `[i, i]`.
fn dirac(shape: &[usize]) -> HostTensor {
    let (o, i, kh, kw) = (shape[0], shape[1], shape[2], shape[3]);
    let mut data = vec![0f32; o * i * kh * kw];
    for c in 0..o.min(i) {
        data[((c * i + c) * kh + kh / 2) * kw + kw / 2] = 1.0;
    }
    HostTensor {
        shape: shape.to_vec(),
        data,
    }
}

struct BatchNorm {
    weight: HostTensor,
    bias: HostTensor,
    mean: HostTensor,
    var: HostTensor,
}

impl BatchNorm {
    /// Folds this batch-norm into the conv before it: returns (weight, bias) as f32.
    fn fold(
        &self,
        conv_key: &str,
        conv: HostTensor,
        weight: &[impl Copy + Into<f64>],
    ) -> Result<(HostTensor, HostTensor), FoldError> {
        let out_ch = conv.shape[0];
        for t in [&self.weight, &self.bias, &self.mean, &self.var] {
            if t.numel() != out_ch {
                return Err(FoldError::Shape {
                    key: format!("batch-norm after {conv_key}"),
                    found: t.shape.clone(),
                    expected: format!("[{out_ch}]"),
                });
            }
        }
        let per = conv.numel() / out_ch.max(1);
        let mut w = Vec::with_capacity(conv.numel());
        let mut b = Vec::with_capacity(out_ch);
        for o in 0..out_ch {
            let a = f64::from(self.weight.data[o]) / (f64::from(self.var.data[o]) + BN_EPS).sqrt();
            b.push((f64::from(self.bias.data[o]) - f64::from(self.mean.data[o]) * a) as f32);
            w.extend(
                weight[o * per..(o + 1) * per]
                    .iter()
                    .map(|&x| (a * x.into()) as f32),
            );
        }
        Ok((
            HostTensor {
                shape: conv.shape,
                data: w,
            },
            HostTensor {
                shape: vec![out_ch],
                data: b,
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shapes(names: &[&str]) -> BTreeMap<String, Vec<usize>> {
        names.iter().map(|n| (n.to_string(), vec![1])).collect()
    }

    #[test]
    fn detects_layouts() {
        let folded = shapes(&["features.conv.weight", "features.conv.bias", "fc.weight"]);
        assert_eq!(
            detect(&folded).unwrap(),
            Layout::Folded {
                prefix: String::new(),
                features: true
            }
        );
        let nested = shapes(&["state_dict.features.conv.weight", "state_dict.fc.weight"]);
        assert_eq!(
            detect(&nested).unwrap(),
            Layout::Folded {
                prefix: "state_dict.".into(),
                features: true
            }
        );
        let bare = shapes(&["conv.weight", "group0.block0.conv.weight", "fc.weight"]);
        assert!(matches!(
            detect(&bare).unwrap(),
            Layout::Folded {
                features: false,
                ..
            }
        ));
        let unfolded = shapes(&["params.conv", "stats.bn.running_mean", "params.fc.weight"]);
        assert_eq!(
            detect(&unfolded).unwrap(),
            Layout::Unfolded {
                prefix: String::new()
            }
        );
        let other = shapes(&["conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight"]);
        let e = detect(&other).unwrap_err().to_string();
        assert!(
            e.contains("found 3 tensors") && e.contains("layer1.0.conv1.weight"),
            "{e}"
        );
    }

    #[test]
    fn dirac_matches_torch_init() {
        let d = dirac(&[3, 2, 3, 3]);
        let ones: Vec<usize> = (0..d.numel()).filter(|&i| d.data[i] == 1.0).collect();
        // [0,0,1,1] and [1,1,1,1]; output channel 2 has none (more outputs than inputs).
        assert_eq!(ones, vec![4, 18 + 9 + 4]);
    }

    #[test]
    fn folds_one_block_by_hand() {
        // One 1-in 1-out 1x1 "conv": w = 3 → normalize → 1; ŵ = β·1 + α·δ = 0.5 + 2·1 = 2.5.
        let t = |shape: Vec<usize>, data: Vec<f32>| HostTensor { shape, data };
        let mut m = BTreeMap::new();
        m.insert("params.conv".to_string(), t(vec![1, 1, 1, 1], vec![2.0]));
        for (k, v) in [
            ("params.bn.weight", 1.0),
            ("params.bn.bias", 0.0),
            ("stats.bn.running_mean", 0.0),
            ("stats.bn.running_var", 1.0 - 1e-5),
            ("params.group0.block0.alpha", 2.0),
            ("params.group0.block0.beta", 0.5),
            ("params.group0.block0.bn.weight", 2.0),
            ("params.group0.block0.bn.bias", 1.0),
            ("stats.group0.block0.bn.running_mean", 0.5),
            ("stats.group0.block0.bn.running_var", 4.0 - 1e-5),
            ("params.fc.bias", 0.25),
        ] {
            m.insert(k.to_string(), t(vec![1], vec![v]));
        }
        m.insert(
            "params.group0.block0.conv".into(),
            t(vec![1, 1, 1, 1], vec![3.0]),
        );
        m.insert("params.fc.weight".into(), t(vec![1, 1], vec![1.5]));
        let shapes = m
            .iter()
            .map(|(k, v)| (k.clone(), v.shape.clone()))
            .collect();
        let layout = detect(&shapes).unwrap();
        let folded = to_folded(&layout, &shapes, |k| {
            Ok::<_, ()>(m.get(k).cloned().unwrap())
        })
        .unwrap();
        let v = |k: &str| folded[k].data[0];
        assert!((v("features.conv.weight") - 2.0).abs() < 1e-6);
        assert!(v("features.conv.bias").abs() < 1e-7);
        // a = 2 / sqrt(4) = 1; weight = 2.5; bias = 1 - 0.5 = 0.5
        assert!((v("features.group0.block0.conv.weight") - 2.5).abs() < 1e-6);
        assert!((v("features.group0.block0.conv.bias") - 0.5).abs() < 1e-6);
        assert_eq!(v("fc.weight"), 1.5);
        assert_eq!(folded.len(), 6);
    }
}
