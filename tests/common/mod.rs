//! Helpers shared by the integration-test crates (`tests/*.rs`, `tests/server/`,
//! `tests/deploy/`): the repository root and the fixtures under `tests/fixtures/`.

// Each test crate uses a subset of these helpers.
#![allow(dead_code)]

use std::path::PathBuf;

/// The repository root (`CARGO_MANIFEST_DIR`), which the tests' relative paths start from.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `tests/fixtures/` (written by `tests/fixtures/make_fixtures.py`).
pub fn fixtures() -> PathBuf {
    root().join("tests/fixtures")
}

/// A path under `tests/fixtures/`, e.g. `fixture("images/chelsea.jpg")`.
pub fn fixture(rel: &str) -> PathBuf {
    fixtures().join(rel)
}
pub mod bombs;
