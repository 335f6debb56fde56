//! A safetensors file read one tensor at a time, as the layers ask for them.
//!
//! Reading every tensor first and then building the layers held the whole file in memory next
//! to the packed weights made from it: the peak of a load was the raw weights (87 MB for
//! DiracNet-34) above everything the model keeps. Here the header is read once, and each
//! tensor is read from the file (no memory map, whose touched pages would count as resident
//! too) when a layer asks for it, packed, and dropped.

use std::{
    collections::{BTreeMap, HashMap},
    fs::File,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
};

use candle_core::{DType, Device, Shape, Tensor};
use safetensors::tensor::TensorInfo;

use super::ModelError;

/// The most header bytes read (safetensors' own limit).
const MAX_HEADER: u64 = 100 << 20;

/// An open safetensors file: its tensors' names, dtypes, shapes and places.
#[derive(Debug)]
pub struct TensorFile {
    file: File,
    path: PathBuf,
    /// Where the data area starts (after the length and the header).
    data_start: u64,
    tensors: HashMap<String, TensorInfo>,
}

impl TensorFile {
    /// Opens `path` and reads its header; every tensor's bytes are checked to lie in the file
    /// and to match its dtype and shape.
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        let err = |reason: String| ModelError::File {
            path: path.display().to_string(),
            reason,
        };
        let file = File::open(path).map_err(|e| err(e.to_string()))?;
        let file_len = file.metadata().map_err(|e| err(e.to_string()))?.len();
        let mut len = [0u8; 8];
        file.read_exact_at(&mut len, 0)
            .map_err(|e| err(format!("not a safetensors file: {e}")))?;
        let n = u64::from_le_bytes(len);
        if n > MAX_HEADER || 8 + n > file_len {
            return Err(err(format!(
                "not a safetensors file: a header of {n} bytes in a file of {file_len}"
            )));
        }
        let mut header = vec![0u8; n as usize];
        file.read_exact_at(&mut header, 8)
            .map_err(|e| err(e.to_string()))?;
        let mut entries: HashMap<String, serde_json::Value> = serde_json::from_slice(&header)
            .map_err(|e| err(format!("not a safetensors header: {e}")))?;
        entries.remove("__metadata__");
        let data_start = 8 + n;
        let mut tensors = HashMap::with_capacity(entries.len());
        for (name, entry) in entries {
            let info: TensorInfo =
                serde_json::from_value(entry).map_err(|e| err(format!("tensor {name}: {e}")))?;
            let (start, end) = info.data_offsets;
            let elements = info.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
            let bytes = elements
                .and_then(|e| e.checked_mul(info.dtype.bitsize()))
                .map(|b| b / 8);
            if start > end || data_start + end as u64 > file_len || bytes != Some(end - start) {
                return Err(err(format!(
                    "tensor {name}: bytes {start}..{end} do not hold a {:?} {:?} inside the file",
                    info.dtype, info.shape
                )));
            }
            tensors.insert(name, info);
        }
        Ok(Self {
            file,
            path: path.to_path_buf(),
            data_start,
            tensors,
        })
    }

    /// Every tensor's shape, by name.
    pub fn shapes(&self) -> BTreeMap<String, Vec<usize>> {
        self.tensors
            .iter()
            .map(|(name, info)| (name.clone(), info.shape.clone()))
            .collect()
    }

    /// A tensor whose dtype is not a floating-point one, if any: `(name, dtype)`.
    pub fn non_float(&self) -> Option<(String, String)> {
        let mut bad: Vec<_> = self
            .tensors
            .iter()
            .filter(|(_, info)| !DType::try_from(info.dtype).is_ok_and(|d| d.is_float()))
            .map(|(name, info)| (name.clone(), format!("{:?}", info.dtype)))
            .collect();
        bad.sort();
        bad.into_iter().next()
    }

    /// Reads tensor `name` from the file, on the CPU, in its stored dtype.
    fn read(&self, name: &str) -> candle_core::Result<Tensor> {
        let info = self.tensors.get(name).ok_or_else(|| {
            candle_core::Error::Msg(format!("{}: no tensor {name}", self.path.display()))
        })?;
        let (start, end) = info.data_offsets;
        let mut bytes = vec![0u8; end - start];
        self.file
            .read_exact_at(&mut bytes, self.data_start + start as u64)
            .map_err(|e| {
                candle_core::Error::Msg(format!("{}: tensor {name}: {e}", self.path.display()))
            })?;
        Tensor::from_raw_buffer(
            &bytes,
            DType::try_from(info.dtype)?,
            &info.shape,
            &Device::Cpu,
        )
    }
}

impl candle_nn::var_builder::SimpleBackend for TensorFile {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let tensor = self.get_unchecked(name, dtype, dev)?;
        if tensor.shape() != &shape {
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {name}"),
                expected: shape,
                got: tensor.shape().clone(),
            });
        }
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.read(name)?.to_dtype(dtype)?.to_device(dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::{tensor::TensorView, Dtype};

    fn write(path: &Path, tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) {
        let views: Vec<(&str, TensorView)> = tensors
            .iter()
            .map(|(name, dtype, shape, data)| {
                (*name, TensorView::new(*dtype, shape.clone(), data).unwrap())
            })
            .collect();
        std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
    }

    fn f32_bytes(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    #[test]
    fn tensors_are_read_one_at_a_time_as_stored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let a: Vec<f32> = (0..6).map(|i| i as f32 * 0.5 - 1.0).collect();
        let b = half::f16::from_f32(3.25).to_le_bytes().repeat(2);
        write(
            &path,
            &[
                ("a", Dtype::F32, vec![2, 3], f32_bytes(&a)),
                ("b", Dtype::F16, vec![2], b),
            ],
        );
        let file = TensorFile::open(&path).unwrap();
        assert_eq!(file.shapes()["a"], vec![2, 3]);
        assert_eq!(file.non_float(), None);
        let vb = candle_nn::VarBuilder::from_backend(Box::new(file), DType::F32, Device::Cpu);
        let got = vb.get((2, 3), "a").unwrap();
        assert_eq!(got.flatten_all().unwrap().to_vec1::<f32>().unwrap(), a);
        // Converted to the builder's dtype.
        let got = vb.get(2, "b").unwrap();
        assert_eq!(got.to_vec1::<f32>().unwrap(), vec![3.25, 3.25]);
        // A wrong shape or name is an error naming the tensor.
        let e = vb.get((3, 2), "a").unwrap_err().to_string();
        assert!(e.contains("shape mismatch for a"), "{e}");
        assert!(vb.get(1, "missing").is_err());
    }

    #[test]
    fn a_file_that_does_not_hold_its_tensors_is_refused_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        write(
            &path,
            &[("w", Dtype::F32, vec![4, 4], f32_bytes(&[1.0; 16]))],
        );
        let whole = std::fs::read(&path).unwrap();
        // Truncated: the tensor's bytes run past the end.
        std::fs::write(&path, &whole[..whole.len() - 4]).unwrap();
        let e = TensorFile::open(&path).unwrap_err().to_string();
        assert!(
            e.contains("tensor w") && e.contains("inside the file"),
            "{e}"
        );
        // A length that is no header.
        std::fs::write(&path, u64::MAX.to_le_bytes()).unwrap();
        let e = TensorFile::open(&path).unwrap_err().to_string();
        assert!(e.contains("not a safetensors file"), "{e}");
        // Not JSON.
        let mut bad = 4u64.to_le_bytes().to_vec();
        bad.extend_from_slice(b"{{{{");
        std::fs::write(&path, bad).unwrap();
        let e = TensorFile::open(&path).unwrap_err().to_string();
        assert!(e.contains("not a safetensors header"), "{e}");
        // Integer weights are named.
        write(&path, &[("ids", Dtype::I64, vec![2], vec![0; 16])]);
        let file = TensorFile::open(&path).unwrap();
        assert_eq!(file.non_float(), Some(("ids".into(), "I64".into())));
    }
}
