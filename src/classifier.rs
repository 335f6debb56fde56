//! Loading a model for classification: [`Classifier::load`] resolves a model's weights (fetch,
//! convert, cache), builds the network on a backend and picks its class labels. The CLI and the
//! server classify through it.

use candle_core::{Device, Tensor};

use crate::{
    model::{Backend, DiracNet, ModelError},
    prediction::{top_k, Prediction},
    registry::{Labels, ModelSpec, Published, Source},
    tensor::{INPUT_CHANNELS, INPUT_LEN, INPUT_SIZE},
    weights::{self, ResolvedWeights, WeightsError, WeightsOptions},
};

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
    /// The authors' accuracy, for a registry model that has it.
    pub published: Option<Published>,
}

/// Errors loading a classifier.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Fetching or converting the weights failed.
    #[error(transparent)]
    Weights(#[from] WeightsError),
    /// A label file given for the model cannot be used.
    #[error("labels: {reason}")]
    Labels {
        /// The model.
        model: String,
        /// What is wrong (the file, the count).
        reason: String,
    },
    /// The weights do not form a DiracNet, or candle failed.
    #[error("loading {path}: {cause}")]
    Model {
        /// The safetensors file.
        path: String,
        /// What went wrong.
        cause: ModelError,
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
        let model =
            tokio::task::spawn_blocking(move || DiracNet::from_safetensors(&path, &backend))
                .await
                .map_err(|e| LoadError::Model {
                    path: weights.path.display().to_string(),
                    cause: ModelError::File {
                        path: weights.path.display().to_string(),
                        reason: format!("load task failed: {e}"),
                    },
                })?
                .map_err(|cause| LoadError::Model {
                    path: weights.path.display().to_string(),
                    cause,
                })?;
        let classes = model.architecture().classes;
        let labels = match &spec.labels {
            Some(file) => Some(Self::label_file(&spec.name, file, classes)?),
            None => Labels::for_model(&spec.source, classes),
        };
        let published = match &spec.source {
            Source::Registry(entry) => entry.published(),
            Source::Url(_) | Source::File(_) => None,
        };
        Ok(Self {
            name: spec.name.clone(),
            model,
            labels,
            weights,
            published,
        })
    }

    /// The labels in `file` (`LABEL` or `WNID LABEL` per line), which must name `classes`
    /// classes.
    fn label_file(
        model: &str,
        file: &std::path::Path,
        classes: usize,
    ) -> Result<Labels, LoadError> {
        let bad = |reason: String| LoadError::Labels {
            model: model.to_string(),
            reason,
        };
        let text = std::fs::read_to_string(file)
            .map_err(|e| bad(format!("reading {}: {e}", file.display())))?;
        let labels = Labels::parse(&text).map_err(|e| bad(format!("{}: {e}", file.display())))?;
        if labels.len() != classes {
            return Err(bad(format!(
                "{} names {} classes; the model has {classes}",
                file.display(),
                labels.len()
            )));
        }
        Ok(labels)
    }

    /// Number of classes.
    pub fn classes(&self) -> usize {
        self.model.architecture().classes
    }

    /// Logits, one row per image, for normalised `[3, 224, 224]` images (CHW, f32), in one
    /// forward pass.
    pub fn logits(&self, images: &[&[f32]]) -> Result<Vec<Vec<f32>>, ModelError> {
        self.logits_tensor(&Self::batch(images)?)
    }

    /// `[N, 3, 224, 224]` on the CPU from normalised CHW images.
    fn batch(images: &[&[f32]]) -> Result<Tensor, ModelError> {
        let mut flat = Vec::with_capacity(images.len() * INPUT_LEN);
        for img in images {
            if img.len() != INPUT_LEN {
                return Err(ModelError::InputShape {
                    found: vec![img.len()],
                });
            }
            flat.extend_from_slice(img);
        }
        Ok(Tensor::from_vec(
            flat,
            (images.len(), INPUT_CHANNELS, INPUT_SIZE, INPUT_SIZE),
            &Device::Cpu,
        )?)
    }

    /// [`Classifier::logits`] in forward passes of at most `batch` images, so that memory stays
    /// bounded for any number of images (none for no image).
    pub fn logits_in_batches(
        &self,
        images: &[&[f32]],
        batch: usize,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        let mut logits = Vec::with_capacity(images.len());
        for chunk in images.chunks(batch.max(1)) {
            logits.extend(self.logits(chunk)?);
        }
        Ok(logits)
    }

    /// Length of an embedding: the pooled features the classifier reads (the last group's width,
    /// 512 for DiracNet-18/34).
    pub fn embedding_len(&self) -> usize {
        self.model
            .architecture()
            .widths
            .last()
            .copied()
            .unwrap_or(0)
    }

    /// One row per image of normalised `[3, 224, 224]` images, in one forward pass: its logits
    /// ([`Self::classes`] values) followed by its embedding ([`Self::embedding_len`] values).
    /// [`Self::split_outputs`] takes a row apart.
    pub fn outputs(&self, images: &[&[f32]]) -> Result<Vec<Vec<f32>>, ModelError> {
        let x = Self::batch(images)?;
        let (logits, embedding) = self.model.forward_with_embedding(&x)?;
        let both = Tensor::cat(&[&logits, &embedding], 1)?;
        Ok(both.to_device(&Device::Cpu)?.to_vec2::<f32>()?)
    }

    /// A row of [`Self::outputs`] as its logits and its embedding.
    pub fn split_outputs<'a>(&self, row: &'a [f32]) -> (&'a [f32], &'a [f32]) {
        row.split_at(self.classes().min(row.len()))
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
