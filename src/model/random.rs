//! Deterministic random weights of any architecture: for benchmarks (`diracnet bench --model
//! random:18`) and tests, where speed does not depend on the values.

use std::collections::BTreeMap;

use super::Architecture;
use crate::tensor::HostTensor;

impl Architecture {
    /// Deterministic random weights of this shape (uniform, He-scaled), every tensor of
    /// [`Architecture::expected_tensors`], the same for the same `seed`.
    pub fn random_weights(&self, seed: u64) -> BTreeMap<String, HostTensor> {
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
                (name, HostTensor { shape, data })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_expected_tensor_reproducibly() {
        let arch = Architecture::tiny();
        let a = arch.random_weights(7);
        let shapes: BTreeMap<String, Vec<usize>> = a
            .iter()
            .map(|(k, t)| (k.clone(), t.shape.clone()))
            .collect();
        assert_eq!(shapes, arch.expected_tensors());
        assert!(a
            .values()
            .all(|t| t.numel() == t.shape.iter().product::<usize>()));
        assert_eq!(a, arch.random_weights(7));
        assert_ne!(a, arch.random_weights(8));
    }
}
