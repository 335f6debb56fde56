//! `POST /classify` and `POST /models/{name}/classify`.
//!
//! Input, the three ways TorchServe users expect:
//! * raw body, `Content-Type: image/*` or `application/octet-stream`;
//! * `multipart/form-data`, one or more file parts (or parts named `file`, `files`, `image`,
//!   `images`), text parts `top_k` and `model` allowed, any other text part an error;
//! * JSON `{"image": "<base64>"}` or `{"images": ["<base64>", ...]}`, optional `top_k`, `model`.
//!
//! This file only reads the request and writes the answer ([`ClassifyRequest`], a
//! [`Protocol`]); [`super::infer`] runs it. Images are decoded and preprocessed on the blocking
//! pool *before* they enter the queue, so the next batch is being prepared while the current
//! one computes.

use std::sync::Arc;

use axum::{
    body::Bytes,
    extract::{rejection::QueryRejection, FromRequest, Multipart, Path, Query, Request, State},
    http::header,
    response::{IntoResponse, Response},
    Json,
};
use serde::{Deserialize, Serialize};

use super::{
    encoding::decode_base64,
    error::ApiError,
    infer::{self, Call, Context, Inferred, Inputs, Protocol},
    AppState,
};
use crate::{classifier::Classifier, prediction::Prediction};

/// Query parameters of the classify routes.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ClassifyQuery {
    /// Number of classes to return per image (default 5, at most the class count).
    #[param(minimum = 1, nullable = false)]
    pub top_k: Option<usize>,
    /// Model to use on `/classify` (default: the first model).
    #[param(nullable = false)]
    pub model: Option<String>,
    /// Also answer each image's embedding: the pooled features the classifier reads (512
    /// numbers for DiracNet-18/34), for similarity search or a linear probe. Default false.
    #[param(nullable = false)]
    pub embedding: Option<bool>,
}

/// JSON request body: exactly one of `image` and `images`; no field may be `null` (leave it
/// out instead), no other field is allowed.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassifyJson {
    /// One base64-encoded image file.
    #[serde(default, deserialize_with = "present")]
    pub image: Option<String>,
    /// Several base64-encoded image files.
    #[serde(default, deserialize_with = "present")]
    pub images: Option<Vec<String>>,
    /// Number of classes to return per image.
    #[serde(default, deserialize_with = "present")]
    pub top_k: Option<usize>,
    /// Model to use (on `/classify`).
    #[serde(default, deserialize_with = "present")]
    pub model: Option<String>,
    /// Also answer each image's embedding.
    #[serde(default, deserialize_with = "present")]
    pub embedding: Option<bool>,
}

/// A field that, when given, holds a value: `null` is an error, as the schema says.
fn present<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(deserializer).map(Some)
}

/// The schemas of the request bodies below are written as JSON: "exactly one of two fields",
/// "never null" and binary files are beyond the derive. These are their shared parts.
fn file_schema() -> serde_json::Value {
    serde_json::json!({
        "type": "string",
        "format": "binary",
        "minLength": 1,
        "description": "An image file: JPEG, PNG, WebP, BMP, GIF or TIFF.",
    })
}

/// `top_k`, in a JSON body or a multipart form.
fn top_k_schema() -> serde_json::Value {
    serde_json::json!({
        "type": "integer",
        "minimum": 1,
        "description": "Classes per image (default 5; at most the model's class count).",
    })
}

/// `model`, in a JSON body or a multipart form.
fn model_schema() -> serde_json::Value {
    serde_json::json!({
        "type": "string",
        "description": "Model to use (on /classify; default the first).",
    })
}

/// `embedding`, in a JSON body or a multipart form.
fn embedding_schema() -> serde_json::Value {
    serde_json::json!({
        "type": "boolean",
        "description": "Also answer each image's embedding (the pooled features the classifier reads); default false.",
    })
}

/// A schema written as JSON. Each is a constant of the right shape: a failure here is a bug,
/// which the OpenAPI test catches.
fn parsed(schema: serde_json::Value) -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
    serde_json::from_value(schema).expect("a valid OpenAPI schema")
}

impl utoipa::PartialSchema for ClassifyJson {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        let base64 = |description: &str| {
            serde_json::json!({
                "type": "string",
                "minLength": 1,
                "format": "byte",
                "contentEncoding": "base64",
                "contentMediaType": "image/*",
                "description": description,
            })
        };
        let schema = serde_json::json!({
            "allOf": [
                {
                    "type": "object",
                    "properties": {
                        "image": base64("One base64-encoded image file."),
                        "images": {
                            "type": "array",
                            "items": base64("A base64-encoded image file."),
                            "minItems": 1,
                            "description": "Several base64-encoded image files (at most --max-queue).",
                        },
                        "top_k": top_k_schema(),
                        "model": model_schema(),
                        "embedding": embedding_schema(),
                    },
                    "additionalProperties": false,
                },
                {
                    "oneOf": [
                        { "type": "object", "required": ["image"] },
                        { "type": "object", "required": ["images"] },
                    ],
                },
            ],
            "description": "Exactly one of `image` and `images`; leave a field out rather than send null.",
        });
        parsed(schema)
    }
}

impl utoipa::ToSchema for ClassifyJson {}

/// An image file sent as the raw body (for the OpenAPI only: a binary string, which Swagger UI
/// uploads from a file picker).
pub struct ImageFile;

impl utoipa::PartialSchema for ImageFile {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        parsed(file_schema())
    }
}

impl utoipa::ToSchema for ImageFile {}

/// A multipart request (for the OpenAPI only): file parts, and optional text parts `top_k` and
/// `model`.
pub struct ClassifyMultipart;

impl utoipa::PartialSchema for ClassifyMultipart {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        let schema = serde_json::json!({
            "type": "object",
            "properties": {
                "file": {
                    "type": "array",
                    "items": file_schema(),
                    "minItems": 1,
                    "description": "One or more image files. Parts named `files`, `image` or `images`, and parts of any name with a file name or an image content type, are images too; any other text part is an error.",
                },
                "top_k": top_k_schema(),
                "model": model_schema(),
                "embedding": embedding_schema(),
            },
            "required": ["file"],
            "additionalProperties": false,
        });
        parsed(schema)
    }
}

impl utoipa::ToSchema for ClassifyMultipart {}

/// Predictions for one image.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ImageResult {
    /// Best classes first.
    pub predictions: Vec<PredictionBody>,
    /// The image's embedding, when asked for (`embedding=true`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub embedding: Option<Vec<f32>>,
}

/// One class.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PredictionBody {
    /// Class index (logit row).
    #[schema(example = 281)]
    pub index: usize,
    /// Class name; null when the model's class count matches no label list.
    #[schema(example = "tabby, tabby cat")]
    pub label: Option<String>,
    /// Softmax probability.
    #[schema(example = 0.41)]
    pub score: f32,
}

impl From<Prediction> for PredictionBody {
    fn from(p: Prediction) -> Self {
        Self {
            index: p.index,
            label: p.label,
            score: p.score,
        }
    }
}

/// Response: `predictions` for one image, `results` (in input order) for several.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ClassifyResponse {
    /// Model that answered.
    pub model: String,
    /// For a single image.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub predictions: Option<Vec<PredictionBody>>,
    /// For several images.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub results: Option<Vec<ImageResult>>,
    /// For a single image, when asked for (`embedding=true`): its embedding.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub embedding: Option<Vec<f32>>,
}

/// Images and options parsed from a request.
struct Parsed {
    images: Vec<Bytes>,
    /// The client sent a list (JSON `images`, or several multipart files).
    many: bool,
    top_k: Option<usize>,
    model: Option<String>,
    embedding: Option<bool>,
}

/// `POST /classify`
#[utoipa::path(
    method(post, put),
    path = "/classify",
    tag = "classify",
    params(ClassifyQuery),
    request_body(
        description = "An image file (raw body; PUT as `curl -T` sends it), multipart file parts, or JSON with base64 images",
        content(
            (ImageFile = "image/*"),
            (ImageFile = "application/octet-stream"),
            (ClassifyJson = "application/json"),
            (ClassifyMultipart = "multipart/form-data"),
        )
    ),
    responses(
        (status = 200, description = "Top-k classes", body = ClassifyResponse,
         headers(("x-request-id" = String), ("x-preprocess-time-ms" = f64), ("x-queue-time-ms" = f64), ("x-inference-time-ms" = f64))),
        super::error::InferenceErrors,
    ),
    security((), ("bearer" = []))
)]
pub async fn classify(
    State(state): State<Arc<AppState>>,
    query: Result<Query<ClassifyQuery>, QueryRejection>,
    request: Request,
) -> Response {
    let request = ClassifyRequest {
        route: "/classify",
        path_model: None,
        query,
        request,
    };
    infer::serve(&state, request).await
}

/// `POST /models/{name}/classify`
#[utoipa::path(
    method(post, put),
    path = "/models/{name}/classify",
    tag = "classify",
    params(("name" = String, Path, description = "Model name"), ClassifyQuery),
    request_body(
        description = "As for /classify",
        content(
            (ImageFile = "image/*"),
            (ImageFile = "application/octet-stream"),
            (ClassifyJson = "application/json"),
            (ClassifyMultipart = "multipart/form-data"),
        )
    ),
    responses(
        (status = 200, description = "Top-k classes", body = ClassifyResponse,
         headers(("x-request-id" = String), ("x-preprocess-time-ms" = f64), ("x-queue-time-ms" = f64), ("x-inference-time-ms" = f64))),
        super::error::InferenceErrors,
    ),
    security((), ("bearer" = []))
)]
pub async fn classify_model(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    query: Result<Query<ClassifyQuery>, QueryRejection>,
    request: Request,
) -> Response {
    let request = ClassifyRequest {
        route: "/models/{name}/classify",
        path_model: Some(name),
        query,
        request,
    };
    infer::serve(&state, request).await
}

/// A classify request as it arrived.
pub struct ClassifyRequest {
    route: &'static str,
    /// The model named in the path (`/models/{name}/classify`).
    path_model: Option<String>,
    query: Result<Query<ClassifyQuery>, QueryRejection>,
    request: Request,
}

/// How to answer a classify request.
pub struct ClassifyAnswer {
    top_k: usize,
    /// Answer each image's embedding too.
    embedding: bool,
    /// The client sent a list: answer `results`, not `predictions`.
    many: bool,
}

impl Protocol for ClassifyRequest {
    type Answer = ClassifyAnswer;

    fn route(&self) -> &'static str {
        self.route
    }

    fn precheck(&self) -> Result<(), ApiError> {
        match &self.query {
            Ok(_) => Ok(()),
            Err(e) => Err(query_error(e)),
        }
    }

    async fn parse(self, context: &Context<'_>) -> Result<Call<ClassifyAnswer>, ApiError> {
        let Query(query) = self.query.map_err(|e| query_error(&e))?;
        let config = context.config;
        let parsed = parse(self.request, config.max_body_bytes, config.batch.max_queue).await?;
        let wanted = agreed(
            "model",
            [
                ("path", self.path_model),
                ("query", query.model),
                ("body", parsed.model),
            ],
        )?;
        let model = context.model(wanted.as_deref())?;
        let classes = model.classifier.classes();
        let top_k = agreed("top_k", [("query", query.top_k), ("body", parsed.top_k)])?
            .unwrap_or(5.min(classes));
        if top_k == 0 || top_k > classes {
            return Err(ApiError::bad_request(format!(
                "top_k must be between 1 and {classes} (the class count)"
            )));
        }
        let embedding = agreed(
            "embedding",
            [("query", query.embedding), ("body", parsed.embedding)],
        )?
        .unwrap_or(false);
        Ok(Call {
            model,
            inputs: Inputs::Encoded(parsed.images),
            answer: ClassifyAnswer {
                top_k,
                embedding,
                many: parsed.many,
            },
        })
    }

    fn respond(answer: ClassifyAnswer, model: &Classifier, mut inferred: Inferred) -> Response {
        let mut results: Vec<ImageResult> = inferred
            .logits
            .iter()
            .zip(std::mem::take(&mut inferred.embeddings))
            .map(|(logits, embedding)| ImageResult {
                predictions: model
                    .predictions(logits, answer.top_k)
                    .into_iter()
                    .map(PredictionBody::from)
                    .collect(),
                embedding: answer.embedding.then_some(embedding),
            })
            .collect();
        let model = model.name.clone();
        let body = if answer.many {
            ClassifyResponse {
                model,
                predictions: None,
                results: Some(results),
                embedding: None,
            }
        } else {
            let one = results.pop();
            let (predictions, embedding) = match one {
                Some(r) => (Some(r.predictions), r.embedding),
                None => (None, None),
            };
            ClassifyResponse {
                model,
                predictions,
                results: None,
                embedding,
            }
        };
        let mut response = Json(body).into_response();
        inferred.insert_timing_headers(response.headers_mut());
        response
    }
}

fn query_error(e: &QueryRejection) -> ApiError {
    ApiError::bad_request(format!("bad query string: {}", e.body_text()))
}

/// Reads the images out of a request according to its content type.
async fn parse(request: Request, max_body: usize, max_images: usize) -> Result<Parsed, ApiError> {
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_string();
    if essence == "application/json" {
        let body = read_body(request, max_body).await?;
        let json: ClassifyJson = serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request(format!("malformed JSON: {e}")))?;
        let (images, many) = match (json.image, json.images) {
            (Some(one), None) => (vec![decode_base64(&one, 0)?], false),
            (None, Some(list)) if list.len() > max_images => {
                return Err(ApiError::too_many_images(list.len(), max_images))
            }
            (None, Some(list)) if !list.is_empty() => (
                list.iter()
                    .enumerate()
                    .map(|(i, s)| decode_base64(s, i))
                    .collect::<Result<_, _>>()?,
                true,
            ),
            (None, Some(_)) => return Err(ApiError::bad_request("\"images\" is empty")),
            (Some(_), Some(_)) => {
                return Err(ApiError::bad_request(
                    "give either \"image\" or \"images\", not both",
                ))
            }
            (None, None) => {
                return Err(ApiError::bad_request(
                    "JSON body needs \"image\" (base64) or \"images\" (list of base64)",
                ))
            }
        };
        Ok(Parsed {
            images,
            many,
            top_k: json.top_k,
            model: json.model,
            embedding: json.embedding,
        })
    } else if essence == "multipart/form-data" {
        parse_multipart(request, max_images).await
    } else if essence.starts_with("image/") || essence == "application/octet-stream" {
        let body = read_body(request, max_body).await?;
        if body.is_empty() {
            return Err(ApiError::bad_request("empty request body"));
        }
        Ok(Parsed {
            images: vec![body],
            many: false,
            top_k: None,
            model: None,
            embedding: None,
        })
    } else if essence.is_empty() {
        Err(ApiError::unsupported_media_type(
            "missing Content-Type: send image/*, application/octet-stream, multipart/form-data or application/json",
        ))
    } else {
        Err(ApiError::unsupported_media_type(format!(
            "unsupported Content-Type {essence:?}: send image/*, application/octet-stream, multipart/form-data or application/json"
        )))
    }
}

async fn read_body(request: Request, max_body: usize) -> Result<Bytes, ApiError> {
    Bytes::from_request(request, &())
        .await
        .map_err(|e| body_error(e.status().as_u16(), e.body_text(), max_body))
}

fn body_error(status: u16, text: String, max_body: usize) -> ApiError {
    if status == 413 {
        ApiError::too_large(max_body)
    } else {
        ApiError::bad_request(format!("could not read the request body: {text}"))
    }
}

/// The value of a setting that may come from several places (path, query, body): the one
/// given, or none; an error when two places give different values (which one was meant?).
fn agreed<T: PartialEq + std::fmt::Debug, const N: usize>(
    name: &str,
    places: [(&str, Option<T>); N],
) -> Result<Option<T>, ApiError> {
    let mut found: Option<(&str, T)> = None;
    for (place, value) in places {
        match (&found, value) {
            (_, None) => {}
            (None, Some(v)) => found = Some((place, v)),
            (Some((_, first)), Some(v)) if *first == v => {}
            (Some((first_place, first)), Some(v)) => {
                return Err(ApiError::bad_request(format!(
                    "{name} is {first:?} in the {first_place} but {v:?} in the {place}"
                )))
            }
        }
    }
    Ok(found.map(|(_, v)| v))
}

/// Multipart parts that hold an image even without a file name or an image content type.
const IMAGE_PARTS: [&str; 4] = ["file", "files", "image", "images"];

async fn parse_multipart(request: Request, max_images: usize) -> Result<Parsed, ApiError> {
    let mut mp = Multipart::from_request(request, &()).await.map_err(|e| {
        ApiError::bad_request(format!("malformed multipart body: {}", e.body_text()))
    })?;
    let mut images = Vec::new();
    let (mut top_k, mut model, mut embedding) = (None, None, None);
    loop {
        let field = match mp.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => return Err(multipart_error(e)),
        };
        let name = field.name().unwrap_or("").to_string();
        let is_file = field.file_name().is_some()
            || field
                .content_type()
                .is_some_and(|c| c.starts_with("image/") || c == "application/octet-stream")
            || IMAGE_PARTS.contains(&name.as_str());
        if !is_file && !["top_k", "model", "embedding"].contains(&name.as_str()) {
            return Err(ApiError::bad_request(format!(
                "unknown form field {name:?}: send images as file parts (or parts named {}), \
                 and optionally top_k, model and embedding",
                IMAGE_PARTS.join(", ")
            )));
        }
        let given = match name.as_str() {
            "top_k" => top_k.is_some(),
            "model" => model.is_some(),
            "embedding" => embedding.is_some(),
            _ => false,
        };
        if !is_file && given {
            return Err(ApiError::bad_request(format!(
                "form field {name:?} given twice"
            )));
        }
        let data = field.bytes().await.map_err(multipart_error)?;
        match name.as_str() {
            "top_k" if !is_file => {
                let text = String::from_utf8_lossy(&data);
                top_k = Some(text.trim().parse().map_err(|_| {
                    ApiError::bad_request(format!("top_k {text:?} is not a number"))
                })?);
            }
            "model" if !is_file => model = Some(String::from_utf8_lossy(&data).trim().to_string()),
            "embedding" if !is_file => {
                let text = String::from_utf8_lossy(&data);
                embedding = Some(match text.trim() {
                    "true" | "1" => true,
                    "false" | "0" => false,
                    _ => {
                        return Err(ApiError::bad_request(format!(
                            "embedding {text:?} is not true or false"
                        )))
                    }
                });
            }
            _ if images.len() == max_images => {
                return Err(ApiError::too_many_images(images.len() + 1, max_images))
            }
            _ => images.push(data),
        }
    }
    if images.is_empty() {
        return Err(ApiError::bad_request("multipart body has no file part"));
    }
    Ok(Parsed {
        many: images.len() > 1,
        images,
        top_k,
        model,
        embedding,
    })
}

fn multipart_error(e: axum::extract::multipart::MultipartError) -> ApiError {
    if e.status().as_u16() == 413 {
        ApiError::new(
            axum::http::StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            e.body_text(),
        )
    } else {
        ApiError::bad_request(format!("malformed multipart body: {}", e.body_text()))
    }
}
