//! Ground floor: the words every layer shares for tensors in host memory and the network's input.
//!
//! A DiracNet takes `[N, 3, 224, 224]` normalised images in CHW order, f32. The preprocessing
//! writes one such image per call, the model reads batches of them, the server and the CLI move
//! them around as rows of [`INPUT_LEN`] values, and `.npy` files hold them as [`HostTensor`]s.

/// Side of the square image the network takes (the centre crop).
pub const INPUT_SIZE: usize = 224;

/// Colour channels of the network input (RGB).
pub const INPUT_CHANNELS: usize = 3;

/// Values in one network input: `3 × 224 × 224`, CHW.
pub const INPUT_LEN: usize = INPUT_CHANNELS * INPUT_SIZE * INPUT_SIZE;

/// A tensor in host memory as `f32`, row-major (C order): what a `.pth` or `.npy` file is read
/// into, and what random weights are made as.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    /// Extents, outermost first.
    pub shape: Vec<usize>,
    /// `shape.iter().product()` values.
    pub data: Vec<f32>,
}

impl HostTensor {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.data.len()
    }

    /// The rows of a `[N, 3, 224, 224]` batch of network inputs, each [`INPUT_LEN`] values long;
    /// `None` for any other shape.
    pub fn input_rows(&self) -> Option<std::slice::ChunksExact<'_, f32>> {
        match self.shape.as_slice() {
            [n, INPUT_CHANNELS, INPUT_SIZE, INPUT_SIZE] if n * INPUT_LEN == self.data.len() => {
                Some(self.data.chunks_exact(INPUT_LEN))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_rows_only_for_batches_of_network_inputs() {
        let batch = HostTensor {
            shape: vec![2, 3, INPUT_SIZE, INPUT_SIZE],
            data: (0..2 * INPUT_LEN).map(|i| i as f32).collect(),
        };
        let rows: Vec<&[f32]> = batch.input_rows().expect("a batch").collect();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1][0], INPUT_LEN as f32);
        let one = HostTensor {
            shape: vec![3, INPUT_SIZE, INPUT_SIZE],
            data: vec![0.0; INPUT_LEN],
        };
        assert!(one.input_rows().is_none(), "no batch dimension");
        let lying = HostTensor {
            shape: vec![2, 3, INPUT_SIZE, INPUT_SIZE],
            data: vec![0.0; INPUT_LEN],
        };
        assert!(lying.input_rows().is_none(), "data shorter than the shape");
    }
}
