//! Ground floor: torch.hub's naming rules for checkpoint URLs, shared by the registry (which
//! checks its entries against them and names models after them) and the downloader (which
//! names cache files and checks hashes by them).
//!
//! - A checkpoint's file name is the last path segment of its URL ([`url_file_name`]).
//! - A file name `name-<hex>.ext` carries a prefix of the file's sha256 ([`hash_prefix`]), which
//!   `torch.hub.load_state_dict_from_url(..., check_hash=True)` checks and so do we.

/// Whether `s` is an `http://` or `https://` URL (scheme case-insensitive): what can be
/// downloaded.
pub fn is_http_url(s: &str) -> bool {
    starts_with_ignore_case(s, "http://") || starts_with_ignore_case(s, "https://")
}

/// The last path segment of a URL, without query or fragment.
pub fn url_file_name(url: &str) -> &str {
    let path = url.split(['?', '#']).next().unwrap_or(url);
    path.rsplit('/').next().unwrap_or(path)
}

/// torch.hub's hash prefix: group 1 of the first match of `-([a-f0-9]*)\.` in the file name.
///
/// `"diracnet18v2folded-a2174e15.pth"` → `Some("a2174e15")`; `"x-.pth"` → `Some("")` (passes
/// any hash); no match → `None` (no check).
pub fn hash_prefix(file_name: &str) -> Option<&str> {
    let bytes = file_name.as_bytes();
    for (start, _) in bytes.iter().enumerate().filter(|&(_, &b)| b == b'-') {
        let digits = bytes[start + 1..]
            .iter()
            .take_while(|&&b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            .count();
        let end = start + 1 + digits;
        if bytes.get(end) == Some(&b'.') {
            // Only ASCII bytes were skipped, so these are char boundaries.
            return Some(&file_name[start + 1..end]);
        }
    }
    None
}

/// The file name without the extension and without the hash part:
/// `diracnet18v2folded-a2174e15.pth` → `diracnet18v2folded`, `mine.pth` → `mine`.
pub fn model_stem(file_name: &str) -> &str {
    let stem = file_name.split('.').next().unwrap_or_default();
    match hash_prefix(file_name) {
        Some(prefix) if !prefix.is_empty() => stem
            .strip_suffix(prefix)
            .and_then(|s| s.strip_suffix('-'))
            .unwrap_or(stem),
        _ => stem,
    }
}

fn starts_with_ignore_case(s: &str, prefix: &str) -> bool {
    s.as_bytes()
        .get(..prefix.len())
        .is_some_and(|head| head.eq_ignore_ascii_case(prefix.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_file_names() {
        assert_eq!(url_file_name("https://a/b/c.pth"), "c.pth");
        assert_eq!(url_file_name("https://a/b/c.pth?x=1#f"), "c.pth");
    }

    #[test]
    fn model_stems() {
        assert_eq!(
            model_stem("diracnet18v2folded-a2174e15.pth"),
            "diracnet18v2folded"
        );
        assert_eq!(model_stem("mine.pth"), "mine");
        assert_eq!(model_stem("x-.pth"), "x-");
        assert_eq!(model_stem("a-b-cafe.tar.pth"), "a-b");
    }

    #[test]
    fn hash_prefix_follows_torch_hub_regex() {
        assert_eq!(
            hash_prefix("diracnet18v2folded-a2174e15.pth"),
            Some("a2174e15")
        );
        assert_eq!(
            hash_prefix("diracnet34v2folded-dfb15d34.pth"),
            Some("dfb15d34")
        );
        assert_eq!(hash_prefix("diracnet18-v2_checkpoint.pth"), None);
        assert_eq!(hash_prefix("a-b-cafe.pth"), Some("cafe"));
        assert_eq!(hash_prefix("x-.pth"), Some(""));
        assert_eq!(hash_prefix("resnet18-f37072fd.pth"), Some("f37072fd"));
        assert_eq!(hash_prefix("a-ABCD.pth"), None);
        assert_eq!(hash_prefix("plain.pth"), None);
        assert_eq!(hash_prefix("a-12.tar.gz"), Some("12"));
        assert_eq!(hash_prefix("trailing-abc"), None);
        assert_eq!(hash_prefix("ünï-c0de.pth"), Some("c0de"));
        assert_eq!(hash_prefix(""), None);
    }

    #[test]
    fn is_http_url_accepts_http_and_https_only() {
        assert!(is_http_url("http://example.com/a.pth"));
        assert!(is_http_url("https://example.com/a.pth"));
        assert!(is_http_url("HTTPS://example.com/a.pth"));
        assert!(!is_http_url("ftp://example.com/a.pth"));
        assert!(!is_http_url("/tmp/a.pth"));
        assert!(!is_http_url("a.pth"));
        assert!(!is_http_url("ht"));
        assert!(!is_http_url("é"));
    }
}
