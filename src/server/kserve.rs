//! KServe v2 / Open Inference Protocol (REST), so Triton and KServe clients work unmodified.
//!
//! * `GET /v2`, `GET /v2/health/live`, `GET /v2/health/ready` (200 true, 400 false),
//!   `GET /v2/models/{m}`, `GET /v2/models/{m}/ready`;
//! * `POST /v2/models/{m}/infer` with one input, either
//!   `FP32 [N, 3, 224, 224]` (already preprocessed) or `BYTES [N]` of base64-encoded image files;
//!   outputs `logits` (FP32 `[N, classes]`) and/or `probabilities` (softmax). The classification
//!   extension (`outputs[].parameters.classification = k`) returns BYTES `[N, k]` strings
//!   `"value:index:label"` (Triton's format; `value` is the output's value: the logit, or the
//!   probability for `probabilities`). The request `id` is echoed.
//!
//! `infer` only reads the request and writes the answer ([`KServeInfer`], a [`Protocol`]);
//! [`super::infer`] runs it.

use std::sync::Arc;

use axum::{
    body::Bytes,
    extract::{Path, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    Json,
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{
    encoding::decode_base64,
    error::ApiError,
    infer::{self, find_model, Call, Context, Inferred, Inputs, Protocol},
    AppState,
};
use crate::{
    classifier::Classifier,
    prediction::{softmax, top_k},
    registry::Labels,
    tensor::{INPUT_LEN, INPUT_SIZE},
};

/// `GET /v2` body.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ServerMetadata {
    /// Server name.
    pub name: &'static str,
    /// Server version.
    pub version: &'static str,
    /// Protocol extensions supported.
    pub extensions: Vec<&'static str>,
}

/// A tensor's description in model metadata.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TensorMetadata {
    /// Tensor name.
    pub name: &'static str,
    /// `FP32` or `BYTES`.
    pub datatype: &'static str,
    /// Shape; -1 for a variable dimension.
    pub shape: Vec<i64>,
}

/// `GET /v2/models/{m}` body.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ModelMetadata {
    /// Model name.
    pub name: String,
    /// Available versions.
    pub versions: Vec<&'static str>,
    /// Framework.
    pub platform: &'static str,
    /// Accepted inputs (send exactly one).
    pub inputs: Vec<TensorMetadata>,
    /// Produced outputs.
    pub outputs: Vec<TensorMetadata>,
}

/// One input tensor of an inference request.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct RequestInput {
    /// Input name (any).
    pub name: String,
    /// Shape: `[N, 3, 224, 224]` for FP32, `[N]` for BYTES.
    pub shape: Vec<i64>,
    /// `FP32` or `BYTES`.
    pub datatype: String,
    /// Parameters (ignored).
    #[serde(default)]
    #[schema(value_type = Object)]
    pub parameters: Map<String, Value>,
    /// Row-major values, flat or nested; BYTES: base64 strings.
    #[schema(value_type = Vec<Object>)]
    pub data: Value,
}

/// A requested output.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct RequestOutput {
    /// `logits` or `probabilities`.
    pub name: String,
    /// `{"classification": k}` for the classification extension.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub parameters: Map<String, Value>,
}

/// `POST /v2/models/{m}/infer` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct InferRequest {
    /// Echoed in the response.
    pub id: Option<String>,
    /// Request parameters (ignored).
    #[serde(default)]
    #[schema(value_type = Object)]
    pub parameters: Map<String, Value>,
    /// Exactly one input.
    pub inputs: Vec<RequestInput>,
    /// Outputs wanted (default: `logits`).
    pub outputs: Option<Vec<RequestOutput>>,
}

/// One output tensor of an inference response.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ResponseOutput {
    /// Output name.
    pub name: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// `FP32` or `BYTES`.
    pub datatype: &'static str,
    /// Row-major values.
    #[schema(value_type = Vec<Object>)]
    pub data: Value,
}

/// `POST /v2/models/{m}/infer` response.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct InferResponse {
    /// Model name.
    pub model_name: String,
    /// Model version.
    pub model_version: &'static str,
    /// The request's id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Outputs.
    pub outputs: Vec<ResponseOutput>,
}

/// Server metadata.
#[utoipa::path(get, path = "/v2", tag = "kserve", responses((status = 200, body = ServerMetadata)))]
pub async fn server_metadata() -> Json<ServerMetadata> {
    Json(ServerMetadata {
        name: "diracnet",
        version: env!("CARGO_PKG_VERSION"),
        extensions: vec!["classification"],
    })
}

fn health(ok: bool, key: &str) -> Response {
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::BAD_REQUEST
    };
    (status, Json(serde_json::json!({ key: ok }))).into_response()
}

/// Liveness.
#[utoipa::path(get, path = "/v2/health/live", tag = "kserve", responses((status = 200)))]
pub async fn live() -> Response {
    health(true, "live")
}

/// Readiness of the server (every model).
#[utoipa::path(get, path = "/v2/health/ready", tag = "kserve", responses((status = 200), (status = 400, description = "not ready")))]
pub async fn ready(State(state): State<Arc<AppState>>) -> Response {
    health(state.not_ready_reason().is_none(), "ready")
}

/// Readiness of one model.
#[utoipa::path(get, path = "/v2/models/{name}/ready", tag = "kserve",
    params(("name" = String, Path, description = "Model name")),
    responses((status = 200), (status = 400, description = "not ready"), (status = 404, body = super::error::ErrorBody)))]
pub async fn model_ready(State(state): State<Arc<AppState>>, Path(name): Path<String>) -> Response {
    let Some(models) = state.models() else {
        return health(false, "ready");
    };
    match find_model(models, Some(&name)) {
        Ok(_) => health(!state.shutting_down(), "ready"),
        Err(e) => e.into_response(),
    }
}

/// Model metadata.
#[utoipa::path(get, path = "/v2/models/{name}", tag = "kserve",
    params(("name" = String, Path, description = "Model name")),
    responses((status = 200, body = ModelMetadata), (status = 404, body = super::error::ErrorBody), (status = 503, body = super::error::ErrorBody)))]
pub async fn model_metadata(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<Json<ModelMetadata>, ApiError> {
    let models = state.models().ok_or_else(ApiError::not_ready)?;
    let m = find_model(models, Some(&name))?;
    let classes = m.classifier.classes() as i64;
    let side = INPUT_SIZE as i64;
    Ok(Json(ModelMetadata {
        name: m.classifier.name.clone(),
        versions: vec!["1"],
        platform: "candle",
        inputs: vec![
            TensorMetadata {
                name: "input",
                datatype: "FP32",
                shape: vec![-1, 3, side, side],
            },
            TensorMetadata {
                name: "image",
                datatype: "BYTES",
                shape: vec![-1],
            },
        ],
        outputs: vec![
            TensorMetadata {
                name: "logits",
                datatype: "FP32",
                shape: vec![-1, classes],
            },
            TensorMetadata {
                name: "probabilities",
                datatype: "FP32",
                shape: vec![-1, classes],
            },
        ],
    }))
}

/// Inference.
#[utoipa::path(post, path = "/v2/models/{name}/infer", tag = "kserve",
    params(("name" = String, Path, description = "Model name")),
    request_body = InferRequest,
    responses((status = 200, body = InferResponse),
        (status = 400, body = super::error::ErrorBody), (status = 404, body = super::error::ErrorBody),
        (status = 413, body = super::error::ErrorBody), (status = 429, body = super::error::ErrorBody),
        (status = 503, body = super::error::ErrorBody)),
    security((), ("bearer" = [])))]
pub async fn infer(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    infer::serve(&state, KServeInfer { name, body }).await
}

/// A KServe v2 inference request as it arrived.
pub struct KServeInfer {
    /// The model in the path.
    name: String,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
}

/// How to answer a KServe v2 inference request.
pub struct KServeAnswer {
    id: Option<String>,
    /// `(output name, classification k)`.
    outputs: Vec<(String, Option<usize>)>,
}

impl Protocol for KServeInfer {
    type Answer = KServeAnswer;

    fn route(&self) -> &'static str {
        "/v2/models/{name}/infer"
    }

    async fn parse(self, context: &Context<'_>) -> Result<Call<KServeAnswer>, ApiError> {
        let model = context.model(Some(&self.name))?;
        let body = self.body.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::too_large(context.config.max_body_bytes)
            } else {
                ApiError::bad_request(e.body_text())
            }
        })?;
        let request: InferRequest = serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request(format!("malformed inference request: {e}")))?;
        let [input] = request.inputs.as_slice() else {
            return Err(ApiError::bad_request(format!(
                "expected exactly one input, got {}",
                request.inputs.len()
            )));
        };
        let outputs = requested_outputs(&request, model.classifier.classes())?;
        let inputs = inputs_from_tensor(input, context.config.batch.max_queue)?;
        Ok(Call {
            model,
            inputs,
            answer: KServeAnswer {
                id: request.id,
                outputs,
            },
        })
    }

    fn respond(answer: KServeAnswer, model: &Classifier, inferred: Inferred) -> Response {
        let classes = model.classes();
        let logits = inferred.logits;
        let n = logits.len();
        let labels = model.labels.as_ref();
        let outputs = answer
            .outputs
            .into_iter()
            .map(|(name, k)| {
                let rows: Vec<Vec<f32>> = if name == "probabilities" {
                    logits.iter().map(|l| softmax(l)).collect()
                } else {
                    logits.clone()
                };
                match k {
                    None => ResponseOutput {
                        name,
                        shape: vec![n, classes],
                        datatype: "FP32",
                        data: Value::from(rows.concat()),
                    },
                    Some(k) => ResponseOutput {
                        name,
                        shape: vec![n, k],
                        datatype: "BYTES",
                        data: Value::from(
                            rows.iter()
                                .flat_map(|r| classification(r, k, labels))
                                .collect::<Vec<_>>(),
                        ),
                    },
                }
            })
            .collect();
        Json(InferResponse {
            model_name: model.name.clone(),
            model_version: "1",
            id: answer.id,
            outputs,
        })
        .into_response()
    }
}

/// `(output name, classification k)` pairs; `logits` when none are requested.
fn requested_outputs(
    request: &InferRequest,
    classes: usize,
) -> Result<Vec<(String, Option<usize>)>, ApiError> {
    let Some(outputs) = &request.outputs else {
        return Ok(vec![("logits".into(), None)]);
    };
    outputs
        .iter()
        .map(|o| {
            if o.name != "logits" && o.name != "probabilities" {
                return Err(ApiError::bad_request(format!(
                    "unknown output {:?}: this model has \"logits\" and \"probabilities\"",
                    o.name
                )));
            }
            let k = match o.parameters.get("classification") {
                None => None,
                Some(v) => match v.as_u64() {
                    Some(k) if k >= 1 && (k as usize) <= classes => Some(k as usize),
                    _ => {
                        return Err(ApiError::bad_request(format!(
                            "classification must be an integer between 1 and {classes}"
                        )))
                    }
                },
            };
            Ok((o.name.clone(), k))
        })
        .collect()
}

/// Triton's classification strings, best first: `value:index:label` (or `value:index`).
fn classification(row: &[f32], k: usize, labels: Option<&Labels>) -> Vec<String> {
    top_k(row, k, labels)
        .into_iter()
        .map(|p| match p.label {
            Some(l) => format!("{}:{}:{}", row[p.index], p.index, l),
            None => format!("{}:{}", row[p.index], p.index),
        })
        .collect()
}

/// The images of the one input: FP32 rows as they are, BYTES as the image files they hold
/// (base64-decoded).
fn inputs_from_tensor(input: &RequestInput, max_images: usize) -> Result<Inputs, ApiError> {
    let per = INPUT_LEN;
    match input.datatype.as_str() {
        "FP32" => {
            let side = INPUT_SIZE as i64;
            let n = match input.shape.as_slice() {
                [n, 3, h, w] if *n >= 1 && *h == side && *w == side => *n as usize,
                s => {
                    return Err(ApiError::bad_request(format!(
                        "FP32 input {:?} has shape {s:?}; expected [N, 3, {side}, {side}]",
                        input.name
                    )))
                }
            };
            if n > max_images {
                return Err(ApiError::too_many_images(n, max_images));
            }
            // No preallocation from the claimed shape: the data decides what is allocated.
            let mut flat = Vec::new();
            flatten_numbers(&input.data, &mut flat)?;
            if flat.len() != n * per {
                return Err(ApiError::bad_request(format!(
                    "FP32 input {:?} has {} values; shape {:?} needs {}",
                    input.name,
                    flat.len(),
                    input.shape,
                    n * per
                )));
            }
            Ok(Inputs::Preprocessed(
                flat.chunks_exact(per).map(<[f32]>::to_vec).collect(),
            ))
        }
        "BYTES" => {
            let items = match &input.data {
                Value::Array(a) => a.clone(),
                other => vec![other.clone()],
            };
            let expected =
                input
                    .shape
                    .iter()
                    .try_fold(1i64, |a, &d| if d < 0 { None } else { a.checked_mul(d) });
            if items.len() > max_images {
                return Err(ApiError::too_many_images(items.len(), max_images));
            }
            if items.is_empty() || expected != Some(items.len() as i64) {
                return Err(ApiError::bad_request(format!(
                    "BYTES input {:?} has {} elements but shape {:?}",
                    input.name,
                    items.len(),
                    input.shape
                )));
            }
            let mut files = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                let Some(s) = item.as_str() else {
                    return Err(ApiError::bad_request(format!(
                        "BYTES element {i} is not a string (base64-encoded image)"
                    )));
                };
                let bytes = decode_base64(s, i)?;
                files.push(bytes);
            }
            Ok(Inputs::Encoded(files))
        }
        other => Err(ApiError::bad_request(format!(
            "input datatype {other:?} is not supported; send FP32 [N,3,224,224] or BYTES [N]"
        ))),
    }
}

fn flatten_numbers(v: &Value, out: &mut Vec<f32>) -> Result<(), ApiError> {
    match v {
        Value::Array(items) => items.iter().try_for_each(|i| flatten_numbers(i, out)),
        Value::Number(n) => {
            let f = n
                .as_f64()
                .ok_or_else(|| ApiError::bad_request("FP32 data holds a non-finite number"))?;
            out.push(f as f32);
            Ok(())
        }
        _ => Err(ApiError::bad_request("FP32 data must be numbers")),
    }
}
