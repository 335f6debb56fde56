//! From logits to answers: softmax, top-k and labels, and a [`Classifier`] that ties a loaded
//! model to its name and label list. Used by the CLI and the server alike.

use candle_core::{Device, Tensor};
use serde::Serialize;

use crate::{
    model::{Backend, DiracNet, ModelError, INPUT_SIZE},
    registry::{Labels, ModelSpec},
    weights::{self, ResolvedWeights, WeightsError, WeightsOptions},
};

/// One class in a top-k answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Prediction {
    /// Logit index.
    pub index: usize,
    /// Class name, or null when the model's class count matches no label list.
    pub label: Option<String>,
    /// Softmax probability.
    pub score: f32,
}

/// Softmax over one row of logits, computed in f64 for stability.
pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f64> = logits
        .iter()
        .map(|&l| (f64::from(l) - f64::from(max)).exp())
        .collect();
    let sum: f64 = exps.iter().sum();
    exps.iter().map(|e| (e / sum) as f32).collect()
}

/// The `k` most probable classes, best first (ties keep index order).
pub fn top_k(logits: &[f32], k: usize, labels: Option<&Labels>) -> Vec<Prediction> {
    let probs = softmax(logits);
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    order
        .into_iter()
        .take(k)
        .map(|index| Prediction {
            index,
            label: labels.and_then(|l| l.get(index)).map(String::from),
            score: probs[index],
        })
        .collect()
}

/// A loaded model with its serving name and labels.
#[derive(Debug, Clone)]
pub struct Classifier {
    /// Name the model is served under.
    pub name: String,
    /// The network.
    pub model: DiracNet,
    /// Class names, when a list matches the class count.
    pub labels: Option<Labels>,
    /// Where the weights came from.
    pub weights: ResolvedWeights,
}

/// Errors loading a classifier.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Fetching or converting the weights failed.
    #[error(transparent)]
    Weights(#[from] WeightsError),
    /// The weights do not form a DiracNet, or candle failed.
    #[error("loading {path}: {source}")]
    Model {
        /// The safetensors file.
        path: String,
        /// What went wrong.
        source: ModelError,
    },
}

impl Classifier {
    /// Resolves the weights behind `spec` (download, convert, cache) and loads them on
    /// `backend`.
    pub async fn load(
        spec: &ModelSpec,
        opts: &WeightsOptions,
        backend: &Backend,
    ) -> Result<Self, LoadError> {
        let weights = weights::resolve(spec, opts).await?;
        let path = weights.path.clone();
        let backend = backend.clone();
        let model = tokio::task::spawn_blocking(move || DiracNet::load(&path, &backend))
            .await
            .map_err(|e| LoadError::Model {
                path: weights.path.display().to_string(),
                source: ModelError::File {
                    path: weights.path.display().to_string(),
                    reason: format!("load task failed: {e}"),
                },
            })?
            .map_err(|source| LoadError::Model {
                path: weights.path.display().to_string(),
                source,
            })?;
        let labels = Labels::for_classes(model.architecture().classes);
        Ok(Self {
            name: spec.name.clone(),
            model,
            labels,
            weights,
        })
    }

    /// Number of classes.
    pub fn classes(&self) -> usize {
        self.model.architecture().classes
    }

    /// Logits, one row per image, for normalised `[3, 224, 224]` images (CHW, f32).
    pub fn logits(&self, images: &[&[f32]]) -> Result<Vec<Vec<f32>>, ModelError> {
        let per = 3 * INPUT_SIZE * INPUT_SIZE;
        let mut flat = Vec::with_capacity(images.len() * per);
        for img in images {
            if img.len() != per {
                return Err(ModelError::InputShape {
                    found: vec![img.len()],
                });
            }
            flat.extend_from_slice(img);
        }
        let x = Tensor::from_vec(
            flat,
            (images.len(), 3, INPUT_SIZE, INPUT_SIZE),
            &Device::Cpu,
        )?;
        self.logits_tensor(&x)
    }

    /// Logits for a batch tensor `[N, 3, 224, 224]`.
    pub fn logits_tensor(&self, x: &Tensor) -> Result<Vec<Vec<f32>>, ModelError> {
        Ok(self
            .model
            .forward(x)?
            .to_device(&Device::Cpu)?
            .to_vec2::<f32>()?)
    }

    /// Top-k predictions for one row of logits.
    pub fn predictions(&self, logits: &[f32], k: usize) -> Vec<Prediction> {
        top_k(logits, k, self.labels.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_sums_to_one_and_is_stable() {
        let p = softmax(&[1000.0, 1000.0, 0.0]);
        assert!((p[0] - 0.5).abs() < 1e-6 && (p[1] - 0.5).abs() < 1e-6 && p[2] == 0.0);
        let p = softmax(&[1.0, 2.0, 3.0]);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!((p[2] - 0.665_240_9).abs() < 1e-6);
    }

    #[test]
    fn top_k_orders_and_labels() {
        let labels = Labels::imagenet();
        let mut logits = vec![0f32; 1000];
        logits[281] = 5.0;
        logits[7] = 3.0;
        logits[9] = 3.0;
        let t = top_k(&logits, 3, Some(&labels));
        assert_eq!(
            t.iter().map(|p| p.index).collect::<Vec<_>>(),
            vec![281, 7, 9]
        );
        assert_eq!(t[0].label.as_deref(), Some("tabby, tabby cat"));
        assert!(t[0].score > t[1].score);
        assert_eq!(top_k(&[1.0, 2.0], 5, None).len(), 2);
        assert_eq!(top_k(&[1.0, 2.0], 5, None)[0].label, None);
    }
}
