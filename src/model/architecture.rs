//! The shape of a folded DiracNet and the names of its tensors: the contract between the
//! weights (a conversion checks a checkpoint against it) and the network (built from it).
//!
//! ```text
//! features.conv.weight                  [stem_width, 3, 7, 7]   (+ .bias)
//! features.group{g}.block{b}.conv.weight [widths[g], c_in, 3, 3] (+ .bias), b < blocks[g]
//! fc.weight                             [classes, widths.last()] (+ .bias)
//! ```

use std::collections::BTreeMap;

/// A set of tensor names and shapes that is not a folded DiracNet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArchitectureError {
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

    /// Infers the architecture from folded tensor names and shapes, and checks that every
    /// tensor is there with the right shape and nothing else is.
    pub fn from_shapes(shapes: &BTreeMap<String, Vec<usize>>) -> Result<Self, ArchitectureError> {
        let shape_of = |key: &str| {
            shapes
                .get(key)
                .ok_or_else(|| ArchitectureError::MissingKey {
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
                _ => return Err(ArchitectureError::ExtraKey { key: key.clone() }),
            }
        }
        let groups = counts.keys().next_back().map_or(0, |g| g + 1);
        if groups == 0 {
            return Err(ArchitectureError::MissingKey {
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
                return Err(ArchitectureError::Shape {
                    key: key.clone(),
                    found: found.clone(),
                    expected: want.clone(),
                });
            }
        }
        if let Some(key) = shapes.keys().find(|k| !expected.contains_key(*k)) {
            return Err(ArchitectureError::ExtraKey { key: key.clone() });
        }
        Ok(arch)
    }
}

#[cfg(test)]
impl Architecture {
    /// A DiracNet-18 shape, 4–32 channels wide with 10 classes: fast enough for any test.
    pub(crate) fn tiny() -> Self {
        Self {
            stem_width: 4,
            widths: vec![4, 8, 16, 32],
            blocks: vec![4, 4, 4, 4],
            classes: 10,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arch() -> Architecture {
        Architecture::tiny()
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
}
