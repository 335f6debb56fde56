//! Start-up: open the device, then for each model load it ([`Classifier::load`]: fetch,
//! convert, build), warm it up, and start its batcher with a forward pass as its compute.

use std::{sync::Arc, time::Instant};

use super::{AppState, ServeError, ServedModel};
use crate::{batcher::Batcher, classifier::Classifier, device, model::Backend, tensor::INPUT_LEN};

/// Loads and warms up every configured model and starts its batcher, in order; the first
/// failure stops start-up.
pub(super) async fn load_models(state: &AppState) -> Result<Vec<ServedModel>, ServeError> {
    let config = &state.config;
    let backend = Backend::new(config.device.open()?, config.conv, config.precision)?;
    let device = backend.device();
    state.set_device_name(device::describe(device));
    tracing::info!(
        device = %device::describe(device),
        requested = %config.device,
        conv = %backend.conv_description(),
        dtype = backend.dtype_name(),
        threads = rayon::current_num_threads(),
        "backend"
    );
    let mut served: Vec<ServedModel> = Vec::new();
    for spec in &config.models {
        if served.iter().any(|m| m.classifier.name == spec.name) {
            return Err(ServeError::DuplicateName(spec.name.clone()));
        }
        let started = Instant::now();
        let classifier = Classifier::load(spec, &config.weights, &backend)
            .await
            .map_err(|cause| ServeError::Load {
                name: spec.name.clone(),
                cause,
            })?;
        let classifier = Arc::new(classifier);
        warm_up(&classifier, config.batch.max_batch_size).await?;
        let a = classifier.model.architecture();
        tracing::info!(
            model = %spec.name,
            source = %classifier.weights.source,
            depth = a.depth(),
            classes = a.classes,
            seconds = started.elapsed().as_secs_f64(),
            "model loaded and warmed up"
        );
        state.metrics.init_model(&spec.name, &backend);
        let network = classifier.clone();
        let batcher = Batcher::spawn(
            &spec.name,
            // Each image's logits and embedding: `infer` splits them.
            move |rows: &[&[f32]]| network.outputs(rows).map_err(|e| e.to_string()),
            config.batch,
            state.metrics.observer(&spec.name),
        )
        .map_err(|cause| ServeError::ComputeThread {
            name: spec.name.clone(),
            cause,
        })?;
        served.push(ServedModel {
            classifier,
            batcher,
        });
    }
    Ok(served)
}

/// One forward pass at batch 1 and one at the largest batch, so the first requests do not pay
/// for allocator growth or kernel selection.
async fn warm_up(classifier: &Arc<Classifier>, max_batch: usize) -> Result<(), ServeError> {
    let c = classifier.clone();
    let result = tokio::task::spawn_blocking(move || {
        let image = vec![0f32; INPUT_LEN];
        for n in [1, max_batch.max(1)] {
            let batch: Vec<&[f32]> = (0..n).map(|_| image.as_slice()).collect();
            c.logits(&batch).map_err(|e| e.to_string())?;
        }
        Ok::<(), String>(())
    })
    .await
    .map_err(|e| e.to_string())
    .and_then(|r| r);
    result.map_err(|reason| ServeError::Warmup {
        name: classifier.name.clone(),
        reason,
    })
}
