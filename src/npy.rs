//! Minimal `.npy` (NumPy format 1.0–3.0) for little-endian C-order arrays of float32, float64
//! (read as float32) and uint8: the CLI's way of taking and giving preprocessed tensors, and of
//! taking images as pixel arrays. The header is checked against the file size before any
//! allocation, so a lying header is an error, not an out-of-memory abort.

use std::{
    io::{Read, Write},
    path::{Path, PathBuf},
};

use crate::tensor::{HostTensor, INPUT_SIZE};

const MAGIC: &[u8] = b"\x93NUMPY";

/// Errors reading or writing `.npy` files.
#[derive(Debug, thiserror::Error)]
pub enum NpyError {
    /// I/O failure.
    #[error("{path}: {cause}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        cause: std::io::Error,
    },
    /// Not a float32 C-order `.npy` of the expected size.
    #[error("{path}: {reason}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// The values of a `.npy` array read by [`read`].
#[derive(Debug, Clone, PartialEq)]
pub enum NpyData {
    /// float32, or float64 rounded to float32.
    F32(Vec<f32>),
    /// uint8.
    U8(Vec<u8>),
}

/// A C-order array read from a `.npy` file.
#[derive(Debug, Clone, PartialEq)]
pub struct NpyArray {
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// The values, `shape`'s product of them.
    pub data: NpyData,
}

/// Reads a little-endian, C-order `.npy` file of float32, float64 or uint8.
pub fn read_f32(path: &Path) -> Result<HostTensor, NpyError> {
    let a = read(path)?;
    match a.data {
        NpyData::F32(data) => Ok(HostTensor {
            shape: a.shape,
            data,
        }),
        NpyData::U8(_) => Err(NpyError::Format {
            path: path.to_path_buf(),
            reason: "dtype uint8; expected float32 ('<f4') or float64 ('<f8')".into(),
        }),
    }
}

/// Reads a little-endian, C-order `.npy` file of float32 (`<f4`), float64 (`<f8`, rounded to
/// float32) or uint8 (`|u1`).
pub fn read(path: &Path) -> Result<NpyArray, NpyError> {
    let io = |cause| NpyError::Io {
        path: path.to_path_buf(),
        cause,
    };
    let bad = |reason: String| NpyError::Format {
        path: path.to_path_buf(),
        reason,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let file_len = f.metadata().map_err(io)?.len();
    let mut pre = [0u8; 8];
    f.read_exact(&mut pre)
        .map_err(|_| bad("too short for a .npy file".into()))?;
    if &pre[..6] != MAGIC {
        return Err(bad("not a .npy file (bad magic)".into()));
    }
    let header_len = match pre[6] {
        1 => {
            let mut b = [0u8; 2];
            f.read_exact(&mut b).map_err(io)?;
            u64::from(u16::from_le_bytes(b))
        }
        2 | 3 => {
            let mut b = [0u8; 4];
            f.read_exact(&mut b).map_err(io)?;
            u64::from(u32::from_le_bytes(b))
        }
        v => return Err(bad(format!("unsupported .npy version {v}"))),
    };
    let offset = if pre[6] == 1 { 10 } else { 12 };
    if offset + header_len > file_len {
        return Err(bad("header longer than the file".into()));
    }
    let mut header = vec![0u8; header_len as usize];
    f.read_exact(&mut header).map_err(io)?;
    let header = String::from_utf8_lossy(&header);
    let field = |name: &str| -> Option<String> {
        let key = format!("'{name}':");
        let rest = header[header.find(&key)? + key.len()..].trim_start();
        let end = if rest.starts_with('(') {
            rest.find(')')? + 1
        } else {
            rest.find([',', '}'])?
        };
        Some(rest[..end].trim().trim_matches('\'').to_string())
    };
    let descr = field("descr").ok_or_else(|| bad("header lacks 'descr'".into()))?;
    let size: u64 = match descr.as_str() {
        "<f4" => 4,
        "<f8" => 8,
        "|u1" | "<u1" => 1,
        _ => {
            return Err(bad(format!(
                "dtype {descr:?}; expected float32 ('<f4'), float64 ('<f8') or uint8 ('|u1')"
            )))
        }
    };
    if field("fortran_order").as_deref() != Some("False") {
        return Err(bad("Fortran-order arrays are not supported".into()));
    }
    let shape_text = field("shape").ok_or_else(|| bad("header lacks 'shape'".into()))?;
    let shape = shape_text
        .trim_matches(|c| c == '(' || c == ')')
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| bad(format!("bad shape {shape_text}")))?;
    let numel = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| bad("shape overflows".into()))?;
    let want = (numel as u64)
        .checked_mul(size)
        .and_then(|n| n.checked_add(offset + header_len))
        .ok_or_else(|| bad("shape overflows".into()))?;
    if file_len != want {
        return Err(bad(format!(
            "shape {shape:?} needs {want} bytes, file has {file_len}"
        )));
    }
    let mut bytes = vec![0u8; numel * size as usize];
    f.read_exact(&mut bytes).map_err(io)?;
    let data = match size {
        4 => NpyData::F32(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
        8 => NpyData::F32(
            bytes
                .chunks_exact(8)
                .map(|c| {
                    let b: [u8; 8] = std::array::from_fn(|i| c[i]);
                    f64::from_le_bytes(b) as f32
                })
                .collect(),
        ),
        _ => NpyData::U8(bytes),
    };
    Ok(NpyArray { shape, data })
}

/// Reads a batch of preprocessed network inputs, `[N, 3, 224, 224]` float32 (see
/// [`HostTensor::input_rows`]); any other shape is an error.
pub fn read_inputs(path: &Path) -> Result<HostTensor, NpyError> {
    let a = read_f32(path)?;
    match a.input_rows() {
        Some(_) => Ok(a),
        None => Err(NpyError::Format {
            path: path.to_path_buf(),
            reason: format!(
                "shape {:?}, expected [N, 3, {INPUT_SIZE}, {INPUT_SIZE}]",
                a.shape
            ),
        }),
    }
}

/// Writes a float32, C-order `.npy` file (format 1.0).
pub fn write_f32(path: &Path, shape: &[usize], data: &[f32]) -> Result<(), NpyError> {
    let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
    let shape_text = match dims.len() {
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape_text}, }}");
    // Pad with spaces so that the data starts on a 64-byte boundary, newline-terminated.
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + 4 * data.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    std::fs::File::create(path)
        .and_then(|mut f| f.write_all(&out))
        .map_err(|cause| NpyError::Io {
            path: path.to_path_buf(),
            cause,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.npy");
        let data: Vec<f32> = (0..24).map(|i| i as f32 * 0.5).collect();
        write_f32(&p, &[2, 3, 4], &data).unwrap();
        let a = read_f32(&p).unwrap();
        assert_eq!(a.shape, vec![2, 3, 4]);
        assert_eq!(a.data, data);
        assert_eq!(std::fs::metadata(&p).unwrap().len() % 4, 0);

        // Truncated data: the header promises more than the file holds.
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 4]).unwrap();
        assert!(read_f32(&p).unwrap_err().to_string().contains("needs"));

        // Header edits on the raw bytes (the data is not UTF-8).
        let edit = |from: &[u8], to: &[u8]| {
            let at = bytes.windows(from.len()).position(|w| w == from).unwrap();
            let mut b = bytes.clone();
            b.splice(at..at + from.len(), to.iter().copied());
            b
        };
        // A lying shape cannot make us allocate.
        write_f32(&p, &[999_999_999_999, 3, 4], &data).unwrap();
        assert!(read_f32(&p).unwrap_err().to_string().contains("needs"));
        write_f32(&p, &[usize::MAX, 3, 4], &data).unwrap();
        assert!(read_f32(&p).unwrap_err().to_string().contains("overflows"));

        std::fs::write(&p, b"not numpy at all").unwrap();
        assert!(read_f32(&p).unwrap_err().to_string().contains("bad magic"));

        std::fs::write(&p, edit(b"<f4", b">f4")).unwrap();
        assert!(read_f32(&p).unwrap_err().to_string().contains("float32"));

        // uint8: the same header with one byte per value (24 values → 24 bytes of data).
        let mut u8s = edit(b"<f4", b"|u1");
        u8s.truncate(u8s.len() - 3 * 24);
        std::fs::write(&p, &u8s).unwrap();
        let a = read(&p).unwrap();
        assert_eq!(a.shape, [2, 3, 4]);
        assert_eq!(
            a.data,
            NpyData::U8(bytes[bytes.len() - 96..][..24].to_vec())
        );
        assert!(read_f32(&p).unwrap_err().to_string().contains("uint8"));
    }

    #[test]
    fn float64_arrays_read_as_float32() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.npy");
        write_f32(&p, &[2], &[0.0, 0.0]).unwrap();
        let mut bytes = std::fs::read(&p).unwrap();
        let at = bytes.windows(3).position(|w| w == b"<f4").unwrap();
        bytes[at..at + 3].copy_from_slice(b"<f8");
        bytes.truncate(bytes.len() - 8);
        bytes.extend(0.1f64.to_le_bytes());
        bytes.extend((-2.5f64).to_le_bytes());
        std::fs::write(&p, &bytes).unwrap();
        let a = read_f32(&p).unwrap();
        assert_eq!(a.data, [0.1f32, -2.5]);
    }

    #[test]
    fn inputs_are_batches_of_224_crops() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.npy");
        let data = vec![0.5f32; 2 * crate::tensor::INPUT_LEN];
        write_f32(&p, &[2, 3, INPUT_SIZE, INPUT_SIZE], &data).unwrap();
        assert_eq!(read_inputs(&p).unwrap().input_rows().unwrap().count(), 2);
        write_f32(
            &p,
            &[3, INPUT_SIZE, INPUT_SIZE],
            &data[..crate::tensor::INPUT_LEN],
        )
        .unwrap();
        let e = read_inputs(&p).unwrap_err().to_string();
        assert!(
            e.contains("shape [3, 224, 224], expected [N, 3, 224, 224]"),
            "{e}"
        );
    }
}
