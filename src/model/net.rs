//! [`DiracNet`]: the whole chain, built from folded tensors and run on a [`Backend`].

use std::{
    collections::{BTreeMap, HashMap},
    path::Path,
};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use super::{
    file::TensorFile,
    layers::{Group, Head, Stem},
    Architecture, Backend, ModelError,
};
use crate::tensor::{INPUT_CHANNELS, INPUT_SIZE};

/// A folded DiracNet ready to run.
#[derive(Debug, Clone)]
pub struct DiracNet {
    arch: Architecture,
    stem: Stem,
    groups: Vec<Group>,
    head: Head,
    backend: Backend,
}

impl DiracNet {
    /// Builds the chain of `arch` from the tensors at `vb` (canonical names: `features.…`,
    /// `fc.…`) for `backend`. `vb` delivers them as the layers will hold them: f32 on the CPU
    /// for the fast path (its convs pack host copies, its `fc` runs on the CPU), the backend's
    /// dtype and device for candle's ([`DiracNet::from_tensors`] chooses so).
    pub fn load(
        vb: VarBuilder,
        arch: &Architecture,
        backend: &Backend,
    ) -> Result<Self, ModelError> {
        let conv = backend.conv();
        let features = vb.pp("features");
        let stem = Stem::load(features.pp("conv"), arch.stem_width, conv)?;
        let mut c_in = arch.stem_width;
        // The stem's conv 7×7/2 and max-pool 3/2 each halve the input.
        let mut side = INPUT_SIZE / 4;
        let last = arch.widths.len().saturating_sub(1);
        let mut groups = Vec::with_capacity(arch.widths.len());
        for (g, (&width, &blocks)) in arch.widths.iter().zip(&arch.blocks).enumerate() {
            let group = features.pp(format!("group{g}"));
            groups.push(Group::load(
                group,
                c_in,
                width,
                blocks,
                side,
                g == last,
                backend,
            )?);
            c_in = width;
            side /= 2;
        }
        let head = Head::load(vb.pp("fc"), c_in, arch.classes, conv)?;
        Ok(Self {
            arch: arch.clone(),
            stem,
            groups,
            head,
            backend: backend.clone(),
        })
    }

    /// Builds the chain from folded tensors, inferring the architecture from their names and
    /// shapes; any tensor missing, extra, misshapen or not floating-point is an error naming it.
    pub fn from_tensors(
        tensors: &BTreeMap<String, Tensor>,
        backend: &Backend,
    ) -> Result<Self, ModelError> {
        let shapes = tensors
            .iter()
            .map(|(k, t)| (k.clone(), t.dims().to_vec()))
            .collect();
        let arch = Architecture::from_shapes(&shapes)?;
        if let Some((key, t)) = tensors.iter().find(|(_, t)| !t.dtype().is_float()) {
            return Err(ModelError::DType {
                key: key.clone(),
                dtype: format!("{:?}", t.dtype()),
            });
        }
        let (dtype, device) = Self::load_as(backend);
        let map: HashMap<String, Tensor> = tensors
            .iter()
            .map(|(k, t)| (k.clone(), t.clone()))
            .collect();
        Self::load(
            VarBuilder::from_tensors(map, dtype, &device),
            &arch,
            backend,
        )
    }

    /// Loads a folded safetensors file onto `backend`, one tensor at a time: each is read
    /// when its layer is built and dropped once packed ([`TensorFile`]).
    pub fn from_safetensors(path: &Path, backend: &Backend) -> Result<Self, ModelError> {
        let file = TensorFile::open(path)?;
        let arch = Architecture::from_shapes(&file.shapes())?;
        if let Some((key, dtype)) = file.non_float() {
            return Err(ModelError::DType { key, dtype });
        }
        let (dtype, device) = Self::load_as(backend);
        Self::load(
            VarBuilder::from_backend(Box::new(file), dtype, device),
            &arch,
            backend,
        )
    }

    /// The dtype and device the layers take their weights in: f32 on the CPU for the fast
    /// path (its convs pack host copies, its `fc` runs on the CPU), else the backend's.
    fn load_as(backend: &Backend) -> (DType, Device) {
        if backend.conv().is_fast() {
            (DType::F32, Device::Cpu)
        } else {
            (backend.dtype(), backend.device().clone())
        }
    }

    /// The architecture read from the weights.
    pub fn architecture(&self) -> &Architecture {
        &self.arch
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        self.backend.device()
    }

    /// Device, convolution implementation and dtype.
    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// f32 logits `[N, classes]` for a batch `[N, 3, 224, 224]` of normalised images.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor, ModelError> {
        let pooled = self.embed(x)?;
        Ok(self.head.classify(&pooled)?.to_dtype(DType::F32)?)
    }

    /// Logits `[N, classes]` and embeddings `[N, channels]` (the pooled features the classifier
    /// reads: 512 for DiracNet-18/34), both f32, from one pass.
    pub fn forward_with_embedding(&self, x: &Tensor) -> Result<(Tensor, Tensor), ModelError> {
        let pooled = self.embed(x)?;
        let logits = self.head.classify(&pooled)?.to_dtype(DType::F32)?;
        Ok((logits, pooled.to_dtype(DType::F32)?))
    }

    /// The pooled features, in the compute dtype.
    fn embed(&self, x: &Tensor) -> Result<Tensor, ModelError> {
        match x.dims() {
            [_, INPUT_CHANNELS, INPUT_SIZE, INPUT_SIZE] => {}
            d => return Err(ModelError::InputShape { found: d.to_vec() }),
        }
        // The pass runs on the caller's thread, which hands each op to the rayon pool. Run
        // whole on a pool worker instead, it woke the caller once per pass rather than once per
        // op (3 % faster at batch 1), but allocated its activations in the malloc arena of
        // whichever worker took it, so every worker's arena grew to a pass's peak (+92 MiB for
        // DiracNet-34 at batch 32).
        // The fast path takes f32 input whatever it computes in (bf16 rounds in its convs).
        let dtype = if self.backend.conv().is_fast() {
            DType::F32
        } else {
            self.backend.dtype()
        };
        let mut x = self
            .stem
            .forward(&x.to_device(self.backend.device())?.to_dtype(dtype)?)?;
        for group in &self.groups {
            x = group.forward(x)?;
        }
        Ok(self.head.pool(&x)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ConvImpl, Precision};

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
    fn forward_shape_and_input_check() {
        let dev = Device::Cpu;
        let tensors = Architecture::tiny()
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

    #[test]
    fn integer_tensors_are_refused_by_name() {
        let mut tensors = to_tensors(&Architecture::tiny(), 5);
        let bias = Tensor::zeros(10, DType::U32, &Device::Cpu).unwrap();
        tensors.insert("fc.bias".into(), bias);
        let e = DiracNet::from_tensors(&tensors, &Backend::cpu()).unwrap_err();
        assert!(
            matches!(e, ModelError::DType { ref key, .. } if key == "fc.bias"),
            "{e}"
        );
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
    fn half_precision_runs_on_the_candle_path() {
        let dev = Device::Cpu;
        let tensors = to_tensors(&Architecture::tiny(), 3);
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
