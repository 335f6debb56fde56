//! KServe v2 / Open Inference Protocol (REST), so Triton and KServe clients work unmodified.
//!
//! * `GET /v2`, `GET /v2/health/live`, `GET /v2/health/ready` (200 true, 400 false),
//!   `GET /v2/models/{m}`, `GET /v2/models/{m}/ready`;
//! * `POST /v2/models/{m}/infer` with one input, either
//!   `FP32 [N, 3, 224, 224]` (already preprocessed) or `BYTES [N]` of base64-encoded image files;
//!   outputs `logits` (FP32 `[N, classes]`), `probabilities` (softmax) and/or `embedding` (FP32
//!   `[N, 512]`: the pooled features the classifier reads). The classification
//!   extension (`outputs[].parameters.classification = k`) returns BYTES `[N, k]` strings
//!   `"value:index:label"` (Triton's format; `value` is the output's value: the logit, or the
//!   probability for `probabilities`). The request `id` is echoed;
//! * Triton's binary tensor data extension both ways (`binary_data_size`, `binary_data`,
//!   `binary_data_output`, the `Inference-Header-Content-Length` header), as `tritonclient`
//!   sends and asks by default;
//! * every model route also under `/versions/1` (the only version);
//! * Triton's statistics extension: `GET /v2/models/stats`, `/v2/models/{m}[/versions/1]/stats`,
//!   from the per-model sums of [`super::metrics`].
//!
//! `infer` only reads the request and writes the answer ([`KServeInfer`], a [`Protocol`]);
//! [`super::infer`] runs it. The body is parsed on the blocking pool, straight into `f32` rows or
//! strings (never into a generic JSON value), with the number of elements bounded while it is
//! read: by the input's `shape` when it comes before `data`, and in any case by what one request
//! may hold (`max_queue` images). FP32 values must be finite float32s (400 otherwise).

use std::{cell::RefCell, fmt, sync::Arc};

use axum::{
    body::Bytes,
    extract::{Path, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use serde::{
    de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor},
    Deserialize, Serialize,
};
use serde_json::{Map, Value};
use utoipa::openapi::schema::{Array, ArrayBuilder, ObjectBuilder, OneOfBuilder, Type};

use super::{
    encoding::decode_base64,
    error::ApiError,
    infer::{self, find_model, Call, Context, Inferred, Inputs, Protocol},
    metrics::Duration64,
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
    /// The model's input. (BYTES `[N]` image files are accepted in its place, under any name:
    /// not listed, as clients that fill every listed input would then send both.)
    pub inputs: Vec<TensorMetadata>,
    /// Produced outputs.
    pub outputs: Vec<TensorMetadata>,
}

/// One input tensor of an inference request.
#[derive(Debug, utoipa::ToSchema)]
pub struct RequestInput {
    /// Input name (any).
    pub name: String,
    /// Shape: `[N, 3, 224, 224]` for FP32, `[N]` for BYTES.
    pub shape: Vec<i64>,
    /// `FP32` or `BYTES`.
    #[schema(pattern = "^(FP32|BYTES)$")]
    pub datatype: String,
    /// `{"binary_data_size": bytes}` when the tensor follows the JSON as binary data (Triton's
    /// binary tensor data extension); other parameters are ignored and not kept.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub parameters: Map<String, Value>,
    /// Row-major values, flat or nested: numbers for FP32, base64 strings for BYTES. (Left out
    /// only in a binary request, whose body is not JSON alone: there `binary_data_size` says
    /// how many bytes after the JSON hold the tensor.)
    #[schema(schema_with = tensor_data_schema, required = true)]
    pub data: Option<TensorData>,
}

/// A requested output.
#[derive(Debug, utoipa::ToSchema)]
pub struct RequestOutput {
    /// `logits`, `probabilities` or `embedding`.
    pub name: String,
    /// `{"classification": k}` for the classification extension, `{"binary_data": true}` for the
    /// output as binary data after the JSON (other parameters are ignored and not kept).
    #[serde(default)]
    #[schema(value_type = Object)]
    pub parameters: Map<String, Value>,
}

/// `POST /v2/models/{m}/infer` body.
#[derive(Debug, utoipa::ToSchema)]
pub struct InferRequest {
    /// Echoed in the response.
    pub id: Option<String>,
    /// `{"binary_data_output": true}` for every output as binary data unless it says otherwise
    /// (other parameters are ignored and not kept).
    #[serde(default)]
    #[schema(value_type = Object)]
    pub parameters: Map<String, Value>,
    /// Exactly one input.
    #[schema(min_items = 1, max_items = 1)]
    pub inputs: Vec<RequestInput>,
    /// Outputs wanted (default: `logits`; at most [`MAX_OUTPUTS`]).
    pub outputs: Option<Vec<RequestOutput>>,
}

/// The most outputs one request may ask for (each is a copy of the answer).
pub const MAX_OUTPUTS: usize = 16;

/// The most dimensions an input's `shape` may have.
pub const MAX_RANK: usize = 16;

/// The OpenAPI schema of an input's `data`: an array of numbers or strings, or of such arrays.
fn tensor_data_schema() -> Array {
    let leaf = || {
        OneOfBuilder::new()
            .item(ObjectBuilder::new().schema_type(Type::Number))
            .item(ObjectBuilder::new().schema_type(Type::String))
    };
    ArrayBuilder::new()
        .items(leaf().item(ArrayBuilder::new().items(leaf().item(ArrayBuilder::new()))))
        .description(Some(
            "Row-major values, flat or nested (arrays of arrays, any depth): finite numbers \
             within the float32 range for FP32, base64-encoded image files for BYTES. Holds \
             exactly as many elements as the shape implies.",
        ))
        .examples([serde_json::json!([0.25, -1.5, 0.75])])
        .build()
}

/// The `data` of an input tensor, read straight from the request body (never through a generic
/// JSON value, and never beyond the bound [`InferRequest`]'s parser sets): numbers as `f32` in
/// rows of one image each, or strings. Nested arrays are flattened in row-major order.
#[derive(Default)]
pub struct TensorData {
    /// FP32: the numbers, in rows of the row length (the last row may be shorter).
    rows: Vec<Vec<f32>>,
    /// BYTES: the strings.
    strings: Vec<String>,
    /// Elements read.
    len: usize,
    /// What the elements are (the first one decides; mixing is refused).
    kind: Option<ElementKind>,
}

/// What a tensor's elements are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ElementKind {
    Number,
    String,
}

impl TensorData {
    /// Number of elements (numbers or strings).
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when there is no element.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl std::fmt::Debug for TensorData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kind {
            Some(ElementKind::Number) => write!(f, "TensorData({} numbers)", self.len),
            Some(ElementKind::String) => write!(f, "TensorData({} strings)", self.len),
            None => f.write_str("TensorData(empty)"),
        }
    }
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
    /// `{"binary_data_size": bytes}` when the data follows the JSON as binary data.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub parameters: Option<Value>,
    /// Row-major values (absent when sent as binary data). FP32 values are written as the
    /// shortest decimal that reads back as the same float32.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<Object>>)]
    pub data: Option<OutputData>,
}

/// The values of an output.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum OutputData {
    /// FP32 (serialised as float32: `0.1`, not `0.10000000149011612`).
    Fp32(Vec<f32>),
    /// BYTES, as strings.
    Bytes(Vec<String>),
}

impl OutputData {
    /// Triton's binary form: little-endian float32s, or each string as its 4-byte
    /// little-endian length and its bytes.
    fn to_binary(&self) -> Vec<u8> {
        match self {
            Self::Fp32(values) => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            Self::Bytes(strings) => strings
                .iter()
                .flat_map(|s| {
                    let len = u32::try_from(s.len()).unwrap_or(u32::MAX);
                    len.to_le_bytes().into_iter().chain(s.bytes())
                })
                .collect(),
        }
    }
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
        extensions: vec!["classification", "binary_tensor_data", "statistics"],
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
        versions: vec![VERSION],
        platform: "candle",
        inputs: vec![TensorMetadata {
            name: "input",
            datatype: "FP32",
            shape: vec![-1, 3, side, side],
        }],
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
            TensorMetadata {
                name: "embedding",
                datatype: "FP32",
                shape: vec![-1, m.classifier.embedding_len() as i64],
            },
        ],
    }))
}

/// Metadata of a model version (only version `1` exists).
#[utoipa::path(get, path = "/v2/models/{name}/versions/{version}", tag = "kserve",
    params(("name" = String, Path, description = "Model name"), ("version" = String, Path, description = "Model version: 1")),
    responses((status = 200, body = ModelMetadata), (status = 404, body = super::error::ErrorBody), (status = 503, body = super::error::ErrorBody)))]
pub async fn version_metadata(
    state: State<Arc<AppState>>,
    Path((name, version)): Path<(String, String)>,
) -> Result<Json<ModelMetadata>, ApiError> {
    check_version(&version)?;
    model_metadata(state, Path(name)).await
}

/// Readiness of a model version (only version `1` exists).
#[utoipa::path(get, path = "/v2/models/{name}/versions/{version}/ready", tag = "kserve",
    params(("name" = String, Path, description = "Model name"), ("version" = String, Path, description = "Model version: 1")),
    responses((status = 200), (status = 400, description = "not ready"), (status = 404, body = super::error::ErrorBody)))]
pub async fn version_ready(
    state: State<Arc<AppState>>,
    Path((name, version)): Path<(String, String)>,
) -> Response {
    match check_version(&version) {
        Ok(()) => model_ready(state, Path(name)).await,
        Err(e) => e.into_response(),
    }
}

/// `GET /v2/models/stats` and `/v2/models/{m}[/versions/{v}]/stats` body (Triton's statistics
/// extension).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct StatsResponse {
    /// One entry per model asked for.
    pub model_stats: Vec<ModelStatistics>,
}

/// One model's statistics since the server started.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ModelStatistics {
    /// Model name.
    pub name: String,
    /// Model version.
    pub version: &'static str,
    /// Milliseconds since the epoch of the last successful inference request (0: none yet).
    pub last_inference: u64,
    /// Images run through the model.
    pub inference_count: u64,
    /// Forward passes (batches).
    pub execution_count: u64,
    /// Inference requests: answered, failed, and their times.
    pub inference_stats: InferenceStatistics,
    /// Forward passes by batch size.
    pub batch_stats: Vec<BatchStatistics>,
}

/// Counts and cumulative nanoseconds of an inference request's steps.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct InferenceStatistics {
    /// Requests answered 2xx, from arrival to answer.
    pub success: Duration64,
    /// Requests answered with an error (any 4xx/5xx for the model), from arrival to answer.
    pub fail: Duration64,
    /// Time in the batching queue, per computed request.
    pub queue: Duration64,
    /// Decoding and preprocessing, per computed request.
    pub compute_input: Duration64,
    /// The forward pass, per computed request.
    pub compute_infer: Duration64,
    /// Writing the answer: not timed separately (always zero).
    pub compute_output: Duration64,
    /// No response cache: always zero.
    pub cache_hit: Duration64,
    /// No response cache: always zero.
    pub cache_miss: Duration64,
}

/// Forward passes of one batch size.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct BatchStatistics {
    /// Images per pass.
    pub batch_size: usize,
    /// Not timed separately (always zero).
    pub compute_input: Duration64,
    /// The passes and their time.
    pub compute_infer: Duration64,
    /// Not timed separately (always zero).
    pub compute_output: Duration64,
}

fn statistics(state: &AppState, names: &[String]) -> StatsResponse {
    StatsResponse {
        model_stats: names
            .iter()
            .map(|name| {
                let s = state.metrics.model_stats(name);
                ModelStatistics {
                    name: name.clone(),
                    version: VERSION,
                    last_inference: s.last_inference_ms,
                    inference_count: s.inference_count,
                    execution_count: s.execution_count,
                    inference_stats: InferenceStatistics {
                        success: s.success,
                        fail: s.fail,
                        queue: s.queue,
                        compute_input: s.compute_input,
                        compute_infer: s.compute_infer,
                        compute_output: Duration64::default(),
                        cache_hit: Duration64::default(),
                        cache_miss: Duration64::default(),
                    },
                    batch_stats: s
                        .batches
                        .iter()
                        .map(|(&batch_size, &d)| BatchStatistics {
                            batch_size,
                            compute_input: Duration64::default(),
                            compute_infer: d,
                            compute_output: Duration64::default(),
                        })
                        .collect(),
                }
            })
            .collect(),
    }
}

/// Statistics of every model (Triton's statistics extension).
#[utoipa::path(get, path = "/v2/models/stats", tag = "kserve",
    responses((status = 200, body = StatsResponse), (status = 503, body = super::error::ErrorBody)))]
pub async fn all_stats(
    State(state): State<Arc<AppState>>,
) -> Result<Json<StatsResponse>, ApiError> {
    let models = state.models().ok_or_else(ApiError::not_ready)?;
    let names: Vec<String> = models.iter().map(|m| m.classifier.name.clone()).collect();
    Ok(Json(statistics(&state, &names)))
}

/// Statistics of one model.
#[utoipa::path(get, path = "/v2/models/{name}/stats", tag = "kserve",
    params(("name" = String, Path, description = "Model name")),
    responses((status = 200, body = StatsResponse), (status = 404, body = super::error::ErrorBody), (status = 503, body = super::error::ErrorBody)))]
pub async fn model_stats(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<Json<StatsResponse>, ApiError> {
    let models = state.models().ok_or_else(ApiError::not_ready)?;
    let m = find_model(models, Some(&name))?;
    let names = [m.classifier.name.clone()];
    Ok(Json(statistics(&state, &names)))
}

/// Statistics of a model version (only version `1` exists).
#[utoipa::path(get, path = "/v2/models/{name}/versions/{version}/stats", tag = "kserve",
    params(("name" = String, Path, description = "Model name"), ("version" = String, Path, description = "Model version: 1")),
    responses((status = 200, body = StatsResponse), (status = 404, body = super::error::ErrorBody), (status = 503, body = super::error::ErrorBody)))]
pub async fn version_stats(
    state: State<Arc<AppState>>,
    Path((name, version)): Path<(String, String)>,
) -> Result<Json<StatsResponse>, ApiError> {
    check_version(&version)?;
    model_stats(state, Path(name)).await
}

/// Inference.
#[utoipa::path(post, path = "/v2/models/{name}/infer", tag = "kserve",
    params(("name" = String, Path, description = "Model name")),
    request_body = InferRequest,
    responses((status = 200, body = InferResponse), super::error::InferenceErrors),
    security((), ("bearer" = [])))]
pub async fn infer(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let header_len = json_header_len(&headers);
    infer::serve(
        &state,
        KServeInfer {
            name,
            header_len,
            body,
        },
    )
    .await
}

/// Inference on a model version (only version `1` exists).
#[utoipa::path(post, path = "/v2/models/{name}/versions/{version}/infer", tag = "kserve",
    params(("name" = String, Path, description = "Model name"), ("version" = String, Path, description = "Model version: 1")),
    request_body = InferRequest,
    responses((status = 200, body = InferResponse), super::error::InferenceErrors),
    security((), ("bearer" = [])))]
pub async fn infer_version(
    State(state): State<Arc<AppState>>,
    Path((name, version)): Path<(String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    if let Err(e) = check_version(&version) {
        return e.into_response();
    }
    infer(State(state), Path(name), headers, body).await
}

/// The request header that gives the JSON's length when binary tensors follow it.
pub const HEADER_LENGTH: &str = "inference-header-content-length";

/// `Inference-Header-Content-Length`: `None` when absent; an error text when not a length.
fn json_header_len(headers: &HeaderMap) -> Option<Result<usize, String>> {
    let value = headers.get(HEADER_LENGTH)?;
    Some(
        value
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .ok_or_else(|| format!("{HEADER_LENGTH} {value:?} is not a length in bytes")),
    )
}

/// The only model version served.
pub const VERSION: &str = "1";

/// 404 for any version but [`VERSION`].
fn check_version(version: &str) -> Result<(), ApiError> {
    if version == VERSION {
        Ok(())
    } else {
        Err(ApiError::not_found(format!(
            "no version {version:?} of this model; the only version is \"{VERSION}\""
        )))
    }
}

/// A KServe v2 inference request as it arrived.
pub struct KServeInfer {
    /// The model in the path.
    name: String,
    /// `Inference-Header-Content-Length`, if sent.
    header_len: Option<Result<usize, String>>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
}

/// One requested output: its name, the classification count (if any), and whether it goes back
/// as binary data.
#[derive(Debug, Clone, PartialEq)]
struct OutputSpec {
    name: String,
    classification: Option<usize>,
    binary: bool,
}

/// How to answer a KServe v2 inference request.
pub struct KServeAnswer {
    id: Option<String>,
    outputs: Vec<OutputSpec>,
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
        let header_len = self.header_len.transpose().map_err(ApiError::bad_request)?;
        let limits = Limits {
            max_images: context.config.batch.max_queue,
            row_len: INPUT_LEN,
        };
        let classes = model.classifier.classes();
        // Parsing a body of up to `max_body_bytes` takes tens of milliseconds or more: on the
        // blocking pool, so that the async workers keep answering (`/healthz` among others).
        let (answer, inputs) =
            tokio::task::spawn_blocking(move || read_request(&body, header_len, limits, classes))
                .await
                .map_err(|e| ApiError::internal(format!("KServe parsing task failed: {e}")))??;
        Ok(Call {
            model,
            inputs,
            answer,
        })
    }

    fn respond(answer: KServeAnswer, model: &Classifier, inferred: Inferred) -> Response {
        let logits = inferred.logits;
        let n = logits.len();
        let labels = model.labels.as_ref();
        let mut binary = Vec::new();
        let outputs = answer
            .outputs
            .into_iter()
            .map(|spec| {
                let rows: Vec<Vec<f32>> = match spec.name.as_str() {
                    "probabilities" => logits.iter().map(|l| softmax(l)).collect(),
                    "embedding" => inferred.embeddings.clone(),
                    _ => logits.clone(),
                };
                let width = rows.first().map_or(0, Vec::len);
                let (shape, datatype, data) = match spec.classification {
                    None => (vec![n, width], "FP32", OutputData::Fp32(rows.concat())),
                    Some(k) => (
                        vec![n, k],
                        "BYTES",
                        OutputData::Bytes(
                            rows.iter()
                                .flat_map(|r| classification(r, k, labels))
                                .collect(),
                        ),
                    ),
                };
                let (parameters, data) = if spec.binary {
                    let bytes = data.to_binary();
                    let size = bytes.len();
                    binary.push(bytes);
                    (Some(serde_json::json!({ "binary_data_size": size })), None)
                } else {
                    (None, Some(data))
                };
                ResponseOutput {
                    name: spec.name,
                    shape,
                    datatype,
                    parameters,
                    data,
                }
            })
            .collect();
        let response = InferResponse {
            model_name: model.name.clone(),
            model_version: VERSION,
            id: answer.id,
            outputs,
        };
        if binary.is_empty() {
            return Json(response).into_response();
        }
        // Binary outputs: the JSON, then each output's bytes in order; the JSON's length in
        // `Inference-Header-Content-Length`.
        let Ok(mut body) = serde_json::to_vec(&response) else {
            return ApiError::internal("serialising the response").into_response();
        };
        let json_len = body.len();
        for b in binary {
            body.extend(b);
        }
        (
            [
                (
                    axum::http::header::CONTENT_TYPE,
                    axum::http::HeaderValue::from_static("application/octet-stream"),
                ),
                (
                    axum::http::HeaderName::from_static(HEADER_LENGTH),
                    axum::http::HeaderValue::from(json_len),
                ),
            ],
            body,
        )
            .into_response()
    }
}

/// The outputs to answer with: `logits` when none are requested. Each goes back as binary
/// data if its `binary_data` says so, else if the request's `binary_data_output` does.
fn requested_outputs(request: &InferRequest, classes: usize) -> Result<Vec<OutputSpec>, ApiError> {
    let flag = |params: &Map<String, Value>, key: &str| -> Result<Option<bool>, ApiError> {
        match params.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(ApiError::bad_request(format!(
                "{key} must be true or false"
            ))),
        }
    };
    let all_binary = flag(&request.parameters, "binary_data_output")?.unwrap_or(false);
    let Some(outputs) = &request.outputs else {
        return Ok(vec![OutputSpec {
            name: "logits".into(),
            classification: None,
            binary: all_binary,
        }]);
    };
    outputs
        .iter()
        .map(|o| {
            if !["logits", "probabilities", "embedding"].contains(&o.name.as_str()) {
                return Err(ApiError::bad_request(format!(
                    "unknown output {:?}: this model has \"logits\", \"probabilities\" and \
                     \"embedding\"",
                    o.name
                )));
            }
            let k = match o.parameters.get("classification") {
                None => None,
                Some(_) if o.name == "embedding" => {
                    return Err(ApiError::bad_request(
                        "classification applies to logits and probabilities, not the embedding",
                    ))
                }
                Some(v) => match v.as_u64() {
                    Some(k) if k >= 1 && (k as usize) <= classes => Some(k as usize),
                    _ => {
                        return Err(ApiError::bad_request(format!(
                            "classification must be an integer between 1 and {classes}"
                        )))
                    }
                },
            };
            Ok(OutputSpec {
                name: o.name.clone(),
                classification: k,
                binary: flag(&o.parameters, "binary_data")?.unwrap_or(all_binary),
            })
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

/// Reads a request body on the blocking pool: splits off the binary tensor data after the
/// JSON (`header_len`, from `Inference-Header-Content-Length`), parses the JSON
/// ([`parse_request`]), checks it against the model (`classes`), and turns its one input into
/// images. Returns how to answer and the images.
fn read_request(
    body: &[u8],
    header_len: Option<usize>,
    limits: Limits,
    classes: usize,
) -> Result<(KServeAnswer, Inputs), ApiError> {
    let (json, binary) = match header_len {
        None => (body, &[][..]),
        Some(len) if len <= body.len() => body.split_at(len),
        Some(len) => {
            return Err(ApiError::bad_request(format!(
                "{HEADER_LENGTH} is {len}, but the body has only {} bytes",
                body.len()
            )))
        }
    };
    let mut request = parse_request(json, limits)?;
    let [input] =
        <[RequestInput; 1]>::try_from(std::mem::take(&mut request.inputs)).map_err(|inputs| {
            ApiError::bad_request(format!("expected exactly one input, got {}", inputs.len()))
        })?;
    let outputs = requested_outputs(&request, classes)?;
    let inputs = inputs_from_tensor(input, binary, limits.max_images)?;
    let answer = KServeAnswer {
        id: request.id,
        outputs,
    };
    Ok((answer, inputs))
}

/// The images of the one input: FP32 rows as they are, BYTES as the image files they hold
/// (base64 strings in JSON; raw bytes as binary data). `binary` is what follows the JSON.
fn inputs_from_tensor(
    input: RequestInput,
    binary: &[u8],
    max_images: usize,
) -> Result<Inputs, ApiError> {
    let per = INPUT_LEN;
    let RequestInput {
        name,
        shape,
        datatype,
        parameters,
        data,
    } = input;
    let binary_size = match parameters.get("binary_data_size") {
        None => None,
        Some(v) => Some(v.as_u64().ok_or_else(|| {
            ApiError::bad_request("binary_data_size must be a whole number of bytes")
        })?),
    };
    let data = match (binary_size, data) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(format!(
                "input {name:?} has both data and binary_data_size; send one"
            )))
        }
        (Some(size), None) => {
            if size != binary.len() as u64 {
                return Err(ApiError::bad_request(format!(
                    "input {name:?}: binary_data_size is {size}, but {} bytes follow the JSON",
                    binary.len()
                )));
            }
            return binary_input(&name, &shape, &datatype, binary, max_images);
        }
        (None, _) if !binary.is_empty() => {
            return Err(ApiError::bad_request(format!(
                "{} bytes follow the JSON, but no input has binary_data_size",
                binary.len()
            )))
        }
        (None, None) => {
            return Err(ApiError::bad_request(format!(
                "input {name:?} has no data (and no binary_data_size)"
            )))
        }
        (None, Some(data)) => data,
    };
    match datatype.as_str() {
        "FP32" => {
            let n = fp32_images(&name, &shape, max_images)?;
            if data.kind == Some(ElementKind::String) {
                return Err(ApiError::bad_request(
                    "FP32 data must be numbers; element 0 is a string",
                ));
            }
            let needed = n.checked_mul(per).ok_or_else(|| {
                ApiError::bad_request(format!("FP32 input {name:?}: shape {shape:?} is too large"))
            })?;
            if data.len != needed {
                return Err(ApiError::bad_request(format!(
                    "FP32 input {name:?} has {} values; shape {shape:?} needs {needed}",
                    data.len
                )));
            }
            // The parser refuses numbers beyond the float32 range and JSON has no NaN or
            // infinity; checked again here, as nothing non-finite may reach the model.
            finite(data.rows.iter().flatten().copied())?;
            let rows = if data.rows.iter().all(|r| r.len() == per) {
                data.rows
            } else {
                data.rows
                    .concat()
                    .chunks_exact(per)
                    .map(<[f32]>::to_vec)
                    .collect()
            };
            Ok(Inputs::Preprocessed(rows))
        }
        "BYTES" => {
            if data.kind == Some(ElementKind::Number) {
                return Err(ApiError::bad_request(
                    "BYTES element 0 is not a string (base64-encoded image)",
                ));
            }
            let items = data.strings;
            bytes_count(&name, &shape, items.len(), max_images)?;
            let files = items
                .into_iter()
                .enumerate()
                .map(|(i, s)| decode_base64(&s, i))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Inputs::Encoded(files))
        }
        other => Err(unsupported_datatype(other)),
    }
}

/// The images an FP32 input's shape holds: `[N, 3, 224, 224]`, at most `max_images`.
fn fp32_images(name: &str, shape: &[i64], max_images: usize) -> Result<usize, ApiError> {
    let side = INPUT_SIZE as i64;
    let n = match shape {
        [n, 3, h, w] if *n >= 1 && *h == side && *w == side => *n as usize,
        s => {
            return Err(ApiError::bad_request(format!(
                "FP32 input {name:?} has shape {s:?}; expected [N, 3, {side}, {side}]"
            )))
        }
    };
    if n > max_images {
        return Err(ApiError::too_many_images(n, max_images));
    }
    Ok(n)
}

/// Checks that `count` BYTES elements are what the shape says, and at most `max_images`.
fn bytes_count(name: &str, shape: &[i64], count: usize, max_images: usize) -> Result<(), ApiError> {
    if count > max_images {
        return Err(ApiError::too_many_images(count, max_images));
    }
    if count == 0 || elements(shape) != Some(count) {
        return Err(ApiError::bad_request(format!(
            "BYTES input {name:?} has {count} elements but shape {shape:?}"
        )));
    }
    Ok(())
}

/// 400 unless every value is a finite float32.
fn finite(values: impl Iterator<Item = f32>) -> Result<(), ApiError> {
    for (i, x) in values.enumerate() {
        if !x.is_finite() {
            return Err(ApiError::bad_request(format!(
                "FP32 data: element {i} is not a finite float32"
            )));
        }
    }
    Ok(())
}

/// An input sent as binary data (Triton's binary tensor data extension): FP32 as little-endian
/// float32s, BYTES as elements of a 4-byte little-endian length and that many bytes, each an
/// image file.
fn binary_input(
    name: &str,
    shape: &[i64],
    datatype: &str,
    bytes: &[u8],
    max_images: usize,
) -> Result<Inputs, ApiError> {
    match datatype {
        "FP32" => {
            let n = fp32_images(name, shape, max_images)?;
            let needed = n * INPUT_LEN * 4;
            if bytes.len() != needed {
                return Err(ApiError::bad_request(format!(
                    "FP32 input {name:?} has {} bytes of binary data; shape {shape:?} needs \
                     {needed}",
                    bytes.len()
                )));
            }
            let values = bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]));
            finite(values.clone())?;
            let values: Vec<f32> = values.collect();
            Ok(Inputs::Preprocessed(
                values
                    .chunks_exact(INPUT_LEN)
                    .map(<[f32]>::to_vec)
                    .collect(),
            ))
        }
        "BYTES" => {
            let mut files = Vec::new();
            let mut rest = bytes;
            while !rest.is_empty() {
                if files.len() == max_images {
                    return Err(ApiError::too_many_images(files.len() + 1, max_images));
                }
                let malformed = || {
                    ApiError::bad_request(format!(
                        "BYTES input {name:?}: element {} of the binary data is cut short \
                         (each is a 4-byte little-endian length, then that many bytes)",
                        files.len()
                    ))
                };
                let (len, tail) = rest.split_first_chunk::<4>().ok_or_else(malformed)?;
                let len = u32::from_le_bytes(*len) as usize;
                if tail.len() < len {
                    return Err(malformed());
                }
                let (file, tail) = tail.split_at(len);
                files.push(Bytes::copy_from_slice(file));
                rest = tail;
            }
            bytes_count(name, shape, files.len(), max_images)?;
            Ok(Inputs::Encoded(files))
        }
        other => Err(unsupported_datatype(other)),
    }
}

fn unsupported_datatype(datatype: &str) -> ApiError {
    ApiError::bad_request(format!(
        "input datatype {datatype:?} is not supported; send FP32 [N,3,224,224] or BYTES [N]"
    ))
}

/// The number of elements a shape implies; `None` for a negative dimension or a product beyond
/// `usize`.
fn elements(shape: &[i64]) -> Option<usize> {
    shape.iter().try_fold(1usize, |product, &d| {
        usize::try_from(d).ok().and_then(|d| product.checked_mul(d))
    })
}

// ---------------------------------------------------------------------------------------------
// Parsing. The body is read with serde's visitors straight into the types above: no generic JSON
// value is ever built (it costs 50-70 times the text), a tensor's `data` goes straight into `f32`
// rows or strings, and what a body may make the parser allocate is bounded as it reads:
//
// * `data`: at most the element count of the input's `shape` when the shape comes first, and
//   otherwise (and never beyond) what the server could ever take in one request, `max_queue`
//   images of `row_len` values for FP32 or `max_queue` strings for BYTES; each row is allocated
//   for at most the elements still allowed;
// * one input (any further inputs are skipped without being kept, then counted for the error);
//   at most [`MAX_OUTPUTS`] outputs; shapes of at most [`MAX_RANK`] dimensions;
// * `parameters` are checked to be objects and skipped, except the keys this server reads
//   (`binary_data_output`, an input's `binary_data_size`, an output's `classification` and
//   `binary_data`), kept as scalars.
// ---------------------------------------------------------------------------------------------

/// What the parser may allocate for a request.
#[derive(Debug, Clone, Copy)]
struct Limits {
    /// The most images one request may hold (the queue size).
    max_images: usize,
    /// Values per image (FP32), [`INPUT_LEN`].
    row_len: usize,
}

impl Limits {
    /// The most FP32 values one request may hold.
    fn max_numbers(self) -> usize {
        self.max_images.saturating_mul(self.row_len)
    }
}

/// Parses a request body (see the section's comment for the bounds). A refusal with a precise
/// status and message (a bound, an out-of-range value) comes back as it is; any other error as a
/// 400 "malformed inference request".
fn parse_request(body: &[u8], limits: Limits) -> Result<InferRequest, ApiError> {
    let refusal = Refusal::default();
    let mut de = serde_json::Deserializer::from_slice(body);
    RequestSeed {
        limits,
        refusal: &refusal,
    }
    .deserialize(&mut de)
    .and_then(|request| de.end().map(|()| request))
    .map_err(|e| {
        refusal
            .take()
            .unwrap_or_else(|| ApiError::bad_request(format!("malformed inference request: {e}")))
    })
}

/// Where the parser leaves the error it refuses a body with (serde's errors carry only text).
#[derive(Default)]
struct Refusal(RefCell<Option<ApiError>>);

impl Refusal {
    /// Keeps `error` (the first one, the cause, if several) and returns serde's error that stops
    /// the parse.
    fn refuse<E: de::Error>(&self, error: ApiError) -> E {
        let stop = E::custom(&error.message);
        self.0.borrow_mut().get_or_insert(error);
        stop
    }

    fn take(&self) -> Option<ApiError> {
        self.0.borrow_mut().take()
    }
}

/// Refuses a second occurrence of a field, before its value is read.
fn once<T, E: de::Error>(seen: &Option<T>, field: &'static str) -> Result<(), E> {
    match seen {
        Some(_) => Err(E::duplicate_field(field)),
        None => Ok(()),
    }
}

#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "lowercase")]
enum RequestField {
    Id,
    Parameters,
    Inputs,
    Outputs,
    #[serde(other)]
    Other,
}

#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "lowercase")]
enum InputField {
    Name,
    Shape,
    Datatype,
    Parameters,
    Data,
    #[serde(other)]
    Other,
}

#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "lowercase")]
enum OutputField {
    Name,
    Parameters,
    #[serde(other)]
    Other,
}

/// Reads an [`InferRequest`].
#[derive(Clone, Copy)]
struct RequestSeed<'r> {
    limits: Limits,
    refusal: &'r Refusal,
}

impl<'de> DeserializeSeed<'de> for RequestSeed<'_> {
    type Value = InferRequest;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<InferRequest, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for RequestSeed<'_> {
    type Value = InferRequest;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an inference request object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<InferRequest, A::Error> {
        let mut id: Option<Option<String>> = None;
        let mut parameters: Option<Map<String, Value>> = None;
        let mut inputs: Option<Vec<RequestInput>> = None;
        let mut outputs: Option<Option<Vec<RequestOutput>>> = None;
        while let Some(field) = map.next_key::<RequestField>()? {
            match field {
                RequestField::Id => {
                    once(&id, "id")?;
                    id = Some(map.next_value()?);
                }
                RequestField::Parameters => {
                    once(&parameters, "parameters")?;
                    parameters =
                        Some(map.next_value_seed(ParametersSeed(&["binary_data_output"]))?);
                }
                RequestField::Inputs => {
                    once(&inputs, "inputs")?;
                    inputs = Some(map.next_value_seed(InputsSeed(self))?);
                }
                RequestField::Outputs => {
                    once(&outputs, "outputs")?;
                    outputs = Some(map.next_value_seed(OutputsSeed(self.refusal))?);
                }
                RequestField::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(InferRequest {
            id: id.flatten(),
            parameters: parameters.unwrap_or_default(),
            inputs: inputs.ok_or_else(|| de::Error::missing_field("inputs"))?,
            outputs: outputs.flatten(),
        })
    }
}

/// Reads `inputs`: keeps the first, skips the others (without keeping anything) to count them.
struct InputsSeed<'r>(RequestSeed<'r>);

impl<'de> DeserializeSeed<'de> for InputsSeed<'_> {
    type Value = Vec<RequestInput>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Vec<RequestInput>, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for InputsSeed<'_> {
    type Value = Vec<RequestInput>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of one input")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<RequestInput>, A::Error> {
        let Some(first) = seq.next_element_seed(InputSeed(self.0))? else {
            return Ok(Vec::new());
        };
        let mut count = 1usize;
        while seq.next_element::<IgnoredAny>()?.is_some() {
            count += 1;
        }
        if count > 1 {
            return Err(self.0.refusal.refuse(ApiError::bad_request(format!(
                "expected exactly one input, got {count}"
            ))));
        }
        Ok(vec![first])
    }
}

/// Reads one [`RequestInput`]; its `data` is bounded by the fields read before it.
struct InputSeed<'r>(RequestSeed<'r>);

impl<'de> DeserializeSeed<'de> for InputSeed<'_> {
    type Value = RequestInput;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<RequestInput, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for InputSeed<'_> {
    type Value = RequestInput;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an input tensor object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RequestInput, A::Error> {
        let RequestSeed { limits, refusal } = self.0;
        let mut name: Option<String> = None;
        let mut shape: Option<Vec<i64>> = None;
        let mut datatype: Option<String> = None;
        let mut parameters: Option<Map<String, Value>> = None;
        let mut data: Option<TensorData> = None;
        while let Some(field) = map.next_key::<InputField>()? {
            match field {
                InputField::Name => {
                    once(&name, "name")?;
                    name = Some(map.next_value()?);
                }
                InputField::Shape => {
                    once(&shape, "shape")?;
                    shape = Some(map.next_value_seed(ShapeSeed(refusal))?);
                }
                InputField::Datatype => {
                    once(&datatype, "datatype")?;
                    datatype = Some(map.next_value()?);
                }
                InputField::Parameters => {
                    once(&parameters, "parameters")?;
                    parameters = Some(map.next_value_seed(ParametersSeed(&["binary_data_size"]))?);
                }
                InputField::Data => {
                    once(&data, "data")?;
                    data = Some(map.next_value_seed(DataSeed::new(DataContext {
                        name: name.as_deref(),
                        datatype: datatype.as_deref(),
                        shape: shape.as_deref(),
                        limits,
                        refusal,
                    }))?);
                }
                InputField::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(RequestInput {
            name: name.ok_or_else(|| de::Error::missing_field("name"))?,
            shape: shape.ok_or_else(|| de::Error::missing_field("shape"))?,
            datatype: datatype.ok_or_else(|| de::Error::missing_field("datatype"))?,
            parameters: parameters.unwrap_or_default(),
            // Absent with binary data; checked against `binary_data_size` in `read_request`.
            data,
        })
    }
}

/// Reads a `shape` of at most [`MAX_RANK`] dimensions.
struct ShapeSeed<'r>(&'r Refusal);

impl<'de> DeserializeSeed<'de> for ShapeSeed<'_> {
    type Value = Vec<i64>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Vec<i64>, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for ShapeSeed<'_> {
    type Value = Vec<i64>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a shape (an array of integers)")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<i64>, A::Error> {
        let mut shape = Vec::new();
        while let Some(d) = seq.next_element::<i64>()? {
            if shape.len() == MAX_RANK {
                return Err(self.0.refuse(ApiError::bad_request(format!(
                    "a shape has at most {MAX_RANK} dimensions"
                ))));
            }
            shape.push(d);
        }
        Ok(shape)
    }
}

/// Reads `outputs` (or `null`): at most [`MAX_OUTPUTS`].
struct OutputsSeed<'r>(&'r Refusal);

impl<'de> DeserializeSeed<'de> for OutputsSeed<'_> {
    type Value = Option<Vec<RequestOutput>>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_option(self)
    }
}

impl<'de> Visitor<'de> for OutputsSeed<'_> {
    type Value = Option<Vec<RequestOutput>>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of outputs")
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut outputs = Vec::new();
        while let Some(output) = seq.next_element::<RequestOutput>()? {
            if outputs.len() == MAX_OUTPUTS {
                return Err(self.0.refuse(ApiError::bad_request(format!(
                    "more than {MAX_OUTPUTS} outputs requested; at most {MAX_OUTPUTS}"
                ))));
            }
            outputs.push(output);
        }
        Ok(Some(outputs))
    }
}

impl<'de> Deserialize<'de> for RequestOutput {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct OutputVisitor;

        impl<'de> Visitor<'de> for OutputVisitor {
            type Value = RequestOutput;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an output object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RequestOutput, A::Error> {
                let mut name: Option<String> = None;
                let mut parameters: Option<Map<String, Value>> = None;
                while let Some(field) = map.next_key::<OutputField>()? {
                    match field {
                        OutputField::Name => {
                            once(&name, "name")?;
                            name = Some(map.next_value()?);
                        }
                        OutputField::Parameters => {
                            once(&parameters, "parameters")?;
                            parameters = Some(map.next_value_seed(ParametersSeed(&[
                                "classification",
                                "binary_data",
                            ]))?);
                        }
                        OutputField::Other => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(RequestOutput {
                    name: name.ok_or_else(|| de::Error::missing_field("name"))?,
                    parameters: parameters.unwrap_or_default(),
                })
            }
        }

        d.deserialize_map(OutputVisitor)
    }
}

/// Reads a `parameters` object, keeping the scalars of the keys named (an array or an object
/// there becomes `null`, refused later as the wrong type) and skipping everything else.
struct ParametersSeed(&'static [&'static str]);

impl<'de> DeserializeSeed<'de> for ParametersSeed {
    type Value = Map<String, Value>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for ParametersSeed {
    type Value = Map<String, Value>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object of parameters")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut kept = Map::new();
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            if self.0.contains(&key.as_ref()) {
                kept.insert(key.into_owned(), map.next_value::<Scalar>()?.0);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(kept)
    }
}

/// A JSON scalar as a [`Value`]; an array or an object is skipped and becomes `null`.
struct Scalar(Value);

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ScalarVisitor;

        impl<'de> Visitor<'de> for ScalarVisitor {
            type Value = Scalar;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON value")
            }

            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Scalar, E> {
                Ok(Scalar(Value::Bool(v)))
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar, E> {
                Ok(Scalar(Value::from(v)))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar(Value::from(v)))
            }

            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Scalar, E> {
                Ok(Scalar(Value::from(v)))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar(Value::from(v)))
            }

            fn visit_unit<E: de::Error>(self) -> Result<Scalar, E> {
                Ok(Scalar(Value::Null))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Scalar, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Scalar(Value::Null))
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Scalar, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Scalar(Value::Null))
            }
        }

        d.deserialize_any(ScalarVisitor)
    }
}

/// What the fields read before an input's `data` say about it.
#[derive(Clone, Copy)]
struct DataContext<'a> {
    name: Option<&'a str>,
    datatype: Option<&'a str>,
    shape: Option<&'a [i64]>,
    limits: Limits,
    refusal: &'a Refusal,
}

/// The most elements `data` may hold, and where that bound comes from.
#[derive(Debug, Clone, Copy)]
struct Bound {
    limit: usize,
    /// The shape's element count (else the server's limit).
    from_shape: bool,
}

/// Reads an input's `data` (a scalar, or arrays nested to any depth) into a [`TensorData`].
struct DataSeed<'a> {
    context: DataContext<'a>,
    data: TensorData,
    /// Set by the first element (which decides numbers or strings).
    bound: Bound,
}

impl<'a> DataSeed<'a> {
    fn new(context: DataContext<'a>) -> Self {
        Self {
            context,
            data: TensorData::default(),
            bound: Bound {
                limit: 0,
                from_shape: false,
            },
        }
    }

    /// What the elements must be: what the first was, else what the datatype says.
    fn expected(&self) -> Option<ElementKind> {
        self.data.kind.or(match self.context.datatype {
            Some("FP32") => Some(ElementKind::Number),
            Some("BYTES") => Some(ElementKind::String),
            _ => None,
        })
    }

    /// The error for element `index`, `what` (e.g. "a boolean"), where it does not belong.
    fn misplaced(&self, what: &str) -> ApiError {
        let index = self.data.len;
        ApiError::bad_request(match self.expected() {
            Some(ElementKind::Number) => {
                format!("FP32 data must be numbers; element {index} is {what}")
            }
            Some(ElementKind::String) => {
                format!("BYTES element {index} is not a string (base64-encoded image)")
            }
            None => format!(
                "input data must be numbers (FP32) or base64 strings (BYTES); element {index} \
                 is {what}"
            ),
        })
    }

    fn refuse<E: de::Error>(&self, error: ApiError) -> E {
        self.context.refusal.refuse(error)
    }

    /// Lets one more element of `kind` in, or refuses the body: a kind the datatype or the
    /// elements before do not allow, or one element more than the bound.
    fn admit<E: de::Error>(&mut self, kind: ElementKind, what: &str) -> Result<(), E> {
        match self.data.kind {
            Some(k) if k == kind => {}
            Some(_) => return Err(self.refuse(self.misplaced(what))),
            None => {
                match self.context.datatype {
                    None | Some("FP32" | "BYTES") => {}
                    Some(other) => return Err(self.refuse(unsupported_datatype(other))),
                }
                if self.expected().is_some_and(|k| k != kind) {
                    return Err(self.refuse(self.misplaced(what)));
                }
                self.data.kind = Some(kind);
                self.bound = self.bound(kind);
            }
        }
        if self.data.len >= self.bound.limit {
            return Err(self.refuse(self.over_bound(kind)));
        }
        Ok(())
    }

    /// The bound of `data` holding elements of `kind`: the shape's element count when the
    /// shape came first and the server could take that many, else the server's limit.
    fn bound(&self, kind: ElementKind) -> Bound {
        let limits = self.context.limits;
        let server = match kind {
            ElementKind::Number => limits.max_numbers(),
            ElementKind::String => limits.max_images,
        };
        match self.context.shape.and_then(elements) {
            Some(n) if n <= server => Bound {
                limit: n,
                from_shape: true,
            },
            _ => Bound {
                limit: server,
                from_shape: false,
            },
        }
    }

    fn over_bound(&self, kind: ElementKind) -> ApiError {
        let Bound { limit, from_shape } = self.bound;
        let max = self.context.limits.max_images;
        if from_shape {
            let input = match self.context.name {
                Some(name) => format!("input {name:?}"),
                None => "the input".to_owned(),
            };
            return ApiError::bad_request(format!(
                "{input} has more data elements than its shape {:?} holds ({limit})",
                self.context.shape.unwrap_or_default()
            ));
        }
        let message = match kind {
            ElementKind::Number => format!(
                "FP32 data holds more than {limit} values ({max} images of {} values); at most \
                 {max} images per request (the queue size)",
                self.context.limits.row_len
            ),
            ElementKind::String => format!(
                "BYTES data holds more than {limit} images; at most {max} per request (the \
                 queue size)"
            ),
        };
        ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too_many_images", message)
    }

    /// Takes a number: `value` as read, `x` as it becomes in float32.
    fn number<E: de::Error>(&mut self, x: f32, value: f64) -> Result<(), E> {
        self.admit(ElementKind::Number, "a number")?;
        let index = self.data.len;
        if !x.is_finite() {
            return Err(self.refuse(ApiError::bad_request(format!(
                "FP32 data: value {value:e} at element {index} is beyond the float32 range \
                 (±{:e})",
                f32::MAX
            ))));
        }
        let row_len = self.context.limits.row_len.max(1);
        match self.data.rows.last_mut() {
            Some(row) if row.len() < row_len => row.push(x),
            _ => {
                // A row is allocated for no more values than the bound still allows.
                let mut row = Vec::with_capacity(row_len.min(self.bound.limit - index));
                row.push(x);
                self.data.rows.push(row);
            }
        }
        self.data.len += 1;
        Ok(())
    }

    fn string<E: de::Error>(&mut self, s: String) -> Result<(), E> {
        self.admit(ElementKind::String, "a string")?;
        self.data.strings.push(s);
        self.data.len += 1;
        Ok(())
    }
}

impl<'de> DeserializeSeed<'de> for DataSeed<'_> {
    type Value = TensorData;

    fn deserialize<D: Deserializer<'de>>(mut self, d: D) -> Result<TensorData, D::Error> {
        Element(&mut self).deserialize(d)?;
        Ok(self.data)
    }
}

/// One element of `data`, or an array of them (read into the [`DataSeed`]).
struct Element<'s, 'a>(&'s mut DataSeed<'a>);

impl<'de> DeserializeSeed<'de> for Element<'_, '_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Element<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("numbers or strings, or arrays of them")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(Element(&mut *self.0))?.is_some() {}
        Ok(())
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        self.0.number(v as f32, v as f64)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.0.number(v as f32, v as f64)
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        self.0.number(v as f32, v)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        self.0.string(v.to_owned())
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<(), E> {
        self.0.string(v)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Err(self.0.refuse(self.0.misplaced("a boolean")))
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Err(self.0.refuse(self.0.misplaced("null")))
    }

    fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(self.0.refuse(self.0.misplaced("an object")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Small images (6 values) and at most 4 per request.
    const SMALL: Limits = Limits {
        max_images: 4,
        row_len: 6,
    };

    fn parse(body: &str) -> Result<InferRequest, ApiError> {
        parse_request(body.as_bytes(), SMALL)
    }

    /// The body of a request with one input whose fields come in this order.
    fn one_input(fields: &str) -> String {
        format!(r#"{{"inputs": [{{{fields}}}]}}"#)
    }

    fn data_of(body: &str) -> TensorData {
        let mut request = parse(body).unwrap_or_else(|e| panic!("{body}: {}", e.message));
        request.inputs.remove(0).data.expect("data")
    }

    fn refused(body: &str) -> ApiError {
        match parse(body) {
            Ok(r) => panic!("{body} was accepted: {r:?}"),
            Err(e) => e,
        }
    }

    fn numbers(n: usize) -> String {
        (0..n).map(|i| i.to_string()).collect::<Vec<_>>().join(",")
    }

    #[test]
    fn nested_and_flat_data_read_the_same_in_rows() {
        let want: Vec<Vec<f32>> = vec![
            (0..6).map(|i| i as f32).collect(),
            (6..12).map(|i| i as f32).collect(),
        ];
        for data in [
            "[0,1,2,3,4,5,6,7,8,9,10,11]",
            "[[[0,1],[2,3],[4,5]],[[6,7],[8,9],[10,11]]]",
            "[[0,1,2,3,4],[5,6,7,8,9,10,11]]",
            "[[[[0]]],[1,[2,[3,[4]]]],5,[],[[]],6,7,8,9,10,[11]]",
            "[0.0,1e0,2,3,4,5,6,7,8,9,10,11]",
        ] {
            for fields in [
                format!(r#""name":"x","shape":[2,6],"datatype":"FP32","data":{data}"#),
                format!(r#""data":{data},"datatype":"FP32","shape":[2,6],"name":"x""#),
            ] {
                let got = data_of(&one_input(&fields));
                assert_eq!(got.rows, want, "{fields}");
                assert_eq!(got.len(), 12);
                assert_eq!(got.kind, Some(ElementKind::Number));
            }
        }
        // A scalar is one element; strings are kept as they are, nested or not.
        let got = data_of(&one_input(
            r#""name":"x","shape":[],"datatype":"FP32","data":-2.5"#,
        ));
        assert_eq!(got.rows, vec![vec![-2.5]]);
        let got = data_of(&one_input(
            r#""name":"x","shape":[2],"datatype":"BYTES","data":[["aGk="],"aGk="]"#,
        ));
        assert_eq!(got.strings, ["aGk=", "aGk="]);
        assert!(got.rows.is_empty());
    }

    #[test]
    fn data_longer_than_a_shape_read_before_it_is_refused_at_the_shapes_count() {
        let e = refused(&one_input(
            r#""name":"x","shape":[1,5],"datatype":"FP32","data":[1,2,3,4,5,6]"#,
        ));
        assert_eq!((e.status, e.kind), (StatusCode::BAD_REQUEST, "bad_request"));
        assert!(
            e.message
                .contains("more data elements than its shape [1, 5] holds (5)"),
            "{}",
            e.message
        );
        assert!(e.message.contains(r#"input "x""#), "{}", e.message);
        // Nested: the bound is on the elements, whatever the nesting.
        let e = refused(&one_input(
            r#""shape":[2],"datatype":"BYTES","data":[["aGk="],["aGk=","aGk="]]"#,
        ));
        assert!(
            e.message
                .contains("the input has more data elements than its shape [2] holds (2)"),
            "{}",
            e.message
        );
        // Exactly the count is fine, and the row is allocated for no more than the shape allows.
        let got = data_of(&one_input(
            r#""name":"x","shape":[1,3],"datatype":"FP32","data":[1,2,3]"#,
        ));
        assert_eq!(got.rows, vec![vec![1.0, 2.0, 3.0]]);
        assert!(
            got.rows[0].capacity() < SMALL.row_len,
            "{}",
            got.rows[0].capacity()
        );
    }

    #[test]
    fn data_beyond_what_a_request_may_hold_is_refused_whatever_the_shape() {
        // No shape before the data: the server's bound, 4 images of 6 values.
        let e = refused(&one_input(&format!(
            r#""data":[{}],"shape":[5,6]"#,
            numbers(25)
        )));
        assert_eq!(
            (e.status, e.kind),
            (StatusCode::PAYLOAD_TOO_LARGE, "too_many_images")
        );
        assert!(e.message.contains("more than 24 values"), "{}", e.message);
        assert!(
            data_of(&one_input(&format!(
                r#""name":"x","datatype":"FP32","data":[{}],"shape":[4,6]"#,
                numbers(24)
            )))
            .len()
                == 24
        );
        // A shape beyond the server's bound does not raise it.
        let e = refused(&one_input(&format!(
            r#""shape":[1000,6],"datatype":"FP32","data":[[{}]]"#,
            numbers(25)
        )));
        assert_eq!(e.kind, "too_many_images", "{}", e.message);
        // BYTES: 4 strings.
        let e = refused(&one_input(r#""data":["a","b","c","d","e"]"#));
        assert_eq!(
            (e.status, e.kind),
            (StatusCode::PAYLOAD_TOO_LARGE, "too_many_images")
        );
        assert!(e.message.contains("more than 4 images"), "{}", e.message);
    }

    #[test]
    fn values_beyond_the_float32_range_are_refused() {
        let body = |v: &str| {
            one_input(&format!(
                r#""name":"x","shape":[1,6],"datatype":"FP32","data":[0,1,2,3,4,{v}]"#
            ))
        };
        for (v, shown) in [
            ("1e39", "1e39"),
            ("-1e39", "-1e39"),
            ("3.5e38", "3.5e38"),
            ("1000000000000000000000000000000000000000", "1e39"),
        ] {
            let e = refused(&body(v));
            assert_eq!((e.status, e.kind), (StatusCode::BAD_REQUEST, "bad_request"));
            assert!(
                e.message.starts_with(&format!(
                    "FP32 data: value {shown} at element 5 is beyond the float32 range"
                )),
                "{v}: {}",
                e.message
            );
        }
        // The largest float32 (as printed) and tiny values are fine.
        let got = data_of(&body("3.4028235e38"));
        assert_eq!(got.rows[0][5], f32::MAX);
        assert_eq!(data_of(&body("-1e-50")).rows[0][5], 0.0);
        // JSON has no NaN or infinity, and numbers beyond f64 are refused as malformed.
        for v in ["NaN", "Infinity", "-Infinity", "inf", "1e400", "\"NaN\""] {
            let e = refused(&body(v));
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{v}");
        }
    }

    #[test]
    fn shape_element_counts_never_overflow() {
        assert_eq!(elements(&[2, 3, 4]), Some(24));
        assert_eq!(elements(&[]), Some(1));
        assert_eq!(elements(&[0, 7]), Some(0));
        assert_eq!(elements(&[-1, 3]), None);
        assert_eq!(elements(&[i64::MAX, i64::MAX]), None);
        assert_eq!(elements(&[1 << 32, 1 << 32]), None);
        let limits = Limits {
            max_images: 4,
            row_len: INPUT_LEN,
        };
        for body in [
            // The bound falls back to the server's: parsed, then refused for the shape.
            r#"{"inputs":[{"name":"x","shape":[9223372036854775807,9223372036854775807],"datatype":"BYTES","data":["aGk="]}]}"#,
            r#"{"inputs":[{"name":"x","shape":[4611686018427387904,3,224,224],"datatype":"FP32","data":[1]}]}"#,
            r#"{"inputs":[{"name":"x","shape":[-1,3,224,224],"datatype":"FP32","data":[1]}]}"#,
        ] {
            let Err(e) = read_request(body.as_bytes(), None, limits, 10) else {
                panic!("{body} was accepted");
            };
            assert!(e.status.is_client_error(), "{body}: {}", e.message);
        }
    }

    #[test]
    fn elements_of_the_wrong_kind_are_refused() {
        for (fields, want) in [
            (
                r#""datatype":"FP32","data":[1,"a"]"#,
                "FP32 data must be numbers; element 1 is a string",
            ),
            (
                r#""data":[1,[2,null]]"#,
                "FP32 data must be numbers; element 2 is null",
            ),
            (
                r#""datatype":"FP32","data":["a"]"#,
                "FP32 data must be numbers; element 0 is a string",
            ),
            (
                r#""datatype":"BYTES","data":["a",1]"#,
                "BYTES element 1 is not a string (base64-encoded image)",
            ),
            (
                r#""datatype":"BYTES","data":[{}]"#,
                "BYTES element 0 is not a string (base64-encoded image)",
            ),
            (
                r#""data":[true]"#,
                "input data must be numbers (FP32) or base64 strings (BYTES); element 0 is a \
                 boolean",
            ),
            (
                r#""datatype":"INT8","data":[1]"#,
                r#"input datatype "INT8" is not supported"#,
            ),
        ] {
            let e = refused(&one_input(fields));
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{fields}");
            assert!(e.message.starts_with(want), "{fields}: {}", e.message);
        }
    }

    #[test]
    fn the_rest_of_a_request_is_bounded_too() {
        let input = r#"{"name":"x","shape":[1],"datatype":"BYTES","data":["aGk="]}"#;
        let e = refused(&format!(r#"{{"inputs":[{input},{input},{input}]}}"#));
        assert_eq!(e.message, "expected exactly one input, got 3");
        let outputs = vec![r#"{"name":"logits"}"#; MAX_OUTPUTS + 1].join(",");
        let e = refused(&format!(r#"{{"inputs":[{input}],"outputs":[{outputs}]}}"#));
        assert!(e.message.contains("more than 16 outputs"), "{}", e.message);
        let e = refused(&one_input(&format!(
            r#""shape":[{}]"#,
            numbers(MAX_RANK + 1)
        )));
        assert!(e.message.contains("at most 16 dimensions"), "{}", e.message);
        let deep = format!("{}1{}", "[".repeat(500), "]".repeat(500));
        let e = refused(&one_input(&format!(r#""data":{deep}"#)));
        assert!(e.message.contains("recursion limit"), "{}", e.message);
        let e = refused(&one_input(r#""data":[1],"data":[2]"#));
        assert!(
            e.message.contains("duplicate field `data`"),
            "{}",
            e.message
        );
        for bad in [
            "",
            "[]",
            r#"{"inputs":{}}"#,
            r#"{"inputs":[]} x"#,
            r#"{"inputs":[],"parameters":[1]}"#,
        ] {
            assert!(
                refused(bad)
                    .message
                    .starts_with("malformed inference request: "),
                "{bad}"
            );
        }
        // Parameters are skipped; unknown fields too; only an output's classification is kept.
        let r = parse(&format!(
            r#"{{"id":"r1","parameters":{{"a":[1,{{"b":2}}]}},"extra":[[[]]],"inputs":[{input}],
                "outputs":[{{"name":"logits","parameters":{{"x":[1],"classification":3}}}},
                           {{"name":"probabilities","parameters":{{"classification":[3]}}}},
                           {{"name":"logits"}}]}}"#
        ))
        .unwrap();
        assert_eq!(r.id.as_deref(), Some("r1"));
        assert!(r.parameters.is_empty());
        let outputs = r.outputs.unwrap_or_default();
        assert_eq!(
            outputs[0].parameters,
            serde_json::json!({"classification": 3})
                .as_object()
                .cloned()
                .unwrap_or_default()
        );
        assert_eq!(
            outputs[1].parameters.get("classification"),
            Some(&Value::Null)
        );
        assert!(outputs[2].parameters.is_empty());
        let r = parse(&format!(
            r#"{{"id":null,"outputs":null,"inputs":[{input}]}}"#
        ))
        .unwrap();
        assert!(r.id.is_none() && r.outputs.is_none());
    }

    #[test]
    fn a_whole_fp32_request_becomes_image_rows_without_copies() {
        let limits = Limits {
            max_images: 4,
            row_len: INPUT_LEN,
        };
        let body = format!(
            r#"{{"id":"7","inputs":[{{"name":"input","shape":[2,3,224,224],"datatype":"FP32","data":[{}]}}]}}"#,
            vec!["0.5"; 2 * INPUT_LEN].join(",")
        );
        let (answer, inputs) = read_request(body.as_bytes(), None, limits, 1000).unwrap();
        assert_eq!(answer.id.as_deref(), Some("7"));
        assert_eq!(
            answer.outputs,
            vec![OutputSpec {
                name: "logits".to_owned(),
                classification: None,
                binary: false,
            }]
        );
        let Inputs::Preprocessed(rows) = inputs else {
            panic!("not preprocessed rows");
        };
        assert_eq!(rows.len(), 2);
        assert!(rows
            .iter()
            .all(|r| r.len() == INPUT_LEN && r.iter().all(|&x| x == 0.5)));
        // Too short for its shape: the message of before.
        let body =
            r#"{"inputs":[{"name":"x","shape":[1,3,224,224],"datatype":"FP32","data":[1.0,2.0]}]}"#;
        let Err(e) = read_request(body.as_bytes(), None, limits, 1000) else {
            panic!("accepted");
        };
        assert_eq!(
            e.message,
            r#"FP32 input "x" has 2 values; shape [1, 3, 224, 224] needs 150528"#
        );
    }

    #[test]
    fn the_openapi_describes_data_as_numbers_or_strings() {
        let schema = serde_json::to_value(tensor_data_schema()).unwrap_or_default();
        assert_eq!(schema["type"], "array", "{schema}");
        let kinds: Vec<&Value> = schema["items"]["oneOf"]
            .as_array()
            .map(|a| a.iter().map(|s| &s["type"]).collect())
            .unwrap_or_default();
        assert_eq!(kinds, ["number", "string", "array"], "{schema}");
        // As a field of an input, required in a JSON request (a binary one is not JSON alone);
        // parameters are not.
        let input = serde_json::to_value(<RequestInput as utoipa::PartialSchema>::schema())
            .unwrap_or_default();
        assert_eq!(input["properties"]["data"]["type"], "array", "{input}");
        assert_eq!(
            input["required"],
            serde_json::json!(["name", "shape", "datatype", "data"]),
            "{input}"
        );
        let request = serde_json::to_value(<InferRequest as utoipa::PartialSchema>::schema())
            .unwrap_or_default();
        assert_eq!(
            request["required"],
            serde_json::json!(["inputs"]),
            "{request}"
        );
    }
}
