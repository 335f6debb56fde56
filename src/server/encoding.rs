//! Image files inside JSON: base64, as `/classify`'s JSON body and KServe's BYTES tensors carry
//! them.

use axum::body::Bytes;
use base64::Engine;

use super::error::ApiError;

/// Decodes the base64 image number `index` of a request (whitespace ignored; a
/// `data:...;base64,` prefix accepted).
pub fn decode_base64(s: &str, index: usize) -> Result<Bytes, ApiError> {
    // Accept data URLs too: `data:image/png;base64,...`.
    let payload = match s.split_once(";base64,") {
        Some((prefix, rest)) if prefix.starts_with("data:") => rest,
        _ => s,
    };
    let cleaned: String = payload
        .chars()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(cleaned.as_bytes())
        .map(Bytes::from)
        .map_err(|e| ApiError::bad_request(format!("image {index}: malformed base64: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_wrapped_and_data_urls() {
        assert_eq!(decode_base64("aGk=", 0).unwrap(), Bytes::from_static(b"hi"));
        assert_eq!(
            decode_base64("aG\n k=", 0).unwrap(),
            Bytes::from_static(b"hi")
        );
        let url = "data:image/png;base64,aGk=";
        assert_eq!(decode_base64(url, 0).unwrap(), Bytes::from_static(b"hi"));
        let e = decode_base64("a!b", 3).unwrap_err();
        assert!(
            e.message.starts_with("image 3: malformed base64"),
            "{}",
            e.message
        );
    }
}
