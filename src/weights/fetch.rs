//! Download of checkpoint files into the cache, compatible with torch.hub's conventions.
//!
//! - The cache file name is the last path segment of the URL, as in torch.hub.
//! - A hash prefix in the file name (`name-<hex>.ext`, see [`hash_prefix`]) is checked against
//!   the SHA-256 of the file, like `torch.hub.load_state_dict_from_url(..., check_hash=True)`.
//! - Downloads stream into `<checkpoints_dir>/<name>.<random>.partial` and are renamed into
//!   place only once complete and verified, so the cache never holds a partial file.
//! - torch.hub's own checkpoint folder is looked up (read-only) before downloading.

use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::hub::{hash_prefix, is_http_url};

/// Read/write chunk size (torch.hub uses 128 KiB too).
const CHUNK: usize = 128 * 1024;

/// User-Agent sent with every request.
const USER_AGENT: &str = concat!("diracnet/", env!("CARGO_PKG_VERSION"));

/// How [`fetch_url`] looks up and downloads files.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// Where downloads land (normally [`super::cache::CacheLayout::checkpoints`]).
    pub checkpoints_dir: PathBuf,
    /// torch.hub's checkpoint folder, looked up after `checkpoints_dir`; never written or deleted.
    pub torch_hub_dir: Option<PathBuf>,
    /// Never touch the network; a cache miss is an error.
    pub offline: bool,
    /// Show an indicatif progress bar instead of periodic log lines.
    pub progress: bool,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// Timeout for each read (not for the whole transfer).
    pub read_timeout: Duration,
    /// Extra attempts after a retryable failure.
    pub retries: u32,
    /// Delay before the first retry; doubled for each further retry.
    pub backoff: Duration,
}

impl FetchOptions {
    /// Defaults: no torch.hub folder, online, no progress bar, 10 s connect timeout,
    /// 60 s read timeout, 3 retries, 500 ms initial backoff.
    pub fn new(checkpoints_dir: PathBuf) -> Self {
        Self {
            checkpoints_dir,
            torch_hub_dir: None,
            offline: false,
            progress: false,
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(60),
            retries: 3,
            backoff: Duration::from_millis(500),
        }
    }
}

/// Where a fetched file came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchSource {
    /// Already in our checkpoints folder.
    Cache,
    /// Used in place from torch.hub's checkpoint folder.
    TorchHub,
    /// Downloaded just now.
    Download,
}

/// A verified local file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    /// The file's path (in the checkpoints folder, or in torch.hub's folder).
    pub path: PathBuf,
    /// SHA-256 of the whole file, lowercase hex.
    pub sha256: String,
    /// Where it came from.
    pub source: FetchSource,
}

/// Why [`fetch_url`] failed. Each message names the URL or path and the cause.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// Not an http(s) URL, or no usable file name in it.
    #[error("invalid URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Cache miss in offline mode.
    #[error(
        "{url} is not cached and offline mode is on (looked in: {looked}); run once without \
         offline mode to download it, or copy the file to {target}",
        looked = display_paths(.looked_in),
        target = .target.display()
    )]
    Offline {
        /// The URL.
        url: String,
        /// The paths that were looked at.
        looked_in: Vec<PathBuf>,
        /// Where the file is expected.
        target: PathBuf,
    },
    /// A local file-system operation failed.
    #[error("{action} {}: {cause}", .path.display())]
    Io {
        /// What was being done, e.g. "creating directory".
        action: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        cause: io::Error,
    },
    /// The HTTP client could not be set up.
    #[error("cannot set up the HTTP client: {}", error_chain(.cause))]
    Client {
        /// The underlying error.
        cause: reqwest::Error,
    },
    /// Connection error, timeout or other transport failure.
    #[error("downloading {url} failed: {}", error_chain(.cause))]
    Network {
        /// The URL.
        url: String,
        /// The underlying error.
        cause: reqwest::Error,
    },
    /// The server answered with a non-success status.
    #[error("downloading {url} failed: HTTP {status}")]
    HttpStatus {
        /// The URL.
        url: String,
        /// The status.
        status: reqwest::StatusCode,
    },
    /// The body ended before Content-Length bytes arrived.
    #[error("downloading {url} failed: truncated body ({got} of {expected} bytes)")]
    Truncated {
        /// The URL.
        url: String,
        /// Content-Length.
        expected: u64,
        /// Bytes received.
        got: u64,
    },
    /// The SHA-256 does not start with the hash prefix in the file name.
    #[error("downloading {url} failed: invalid hash value (expected {expected}, got {got})")]
    HashMismatch {
        /// The URL.
        url: String,
        /// The prefix from the file name.
        expected: String,
        /// The full SHA-256 of what was received.
        got: String,
    },
}

impl FetchError {
    /// Whether another attempt may succeed: transport errors, timeouts, truncated bodies,
    /// HTTP 5xx and 429.
    pub fn is_retryable(&self) -> bool {
        match self {
            FetchError::Network { cause, .. } => !cause.is_builder() && !cause.is_redirect(),
            FetchError::HttpStatus { status, .. } => {
                status.is_server_error() || *status == reqwest::StatusCode::TOO_MANY_REQUESTS
            }
            FetchError::Truncated { .. } => true,
            _ => false,
        }
    }
}

/// SHA-256 of a file, lowercase hex.
pub fn sha256_file(path: &Path) -> io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    loop {
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => hasher.update(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(to_hex(&hasher.finalize()))
}

/// Make sure the file behind an http(s) URL is available locally and verified; return its
/// path and SHA-256.
///
/// Looks in `checkpoints_dir` (a file failing its hash prefix is deleted and treated as a
/// miss), then in `torch_hub_dir` (used in place if it passes), then downloads unless offline.
pub async fn fetch_url(url: &str, opts: &FetchOptions) -> Result<Fetched, FetchError> {
    let name = file_name_from_url(url)?;
    let prefix = hash_prefix(&name);
    let target = opts.checkpoints_dir.join(&name);

    if let Some(sha256) = check_cached(&target, prefix).await? {
        tracing::debug!(path = %target.display(), "using cached file");
        return Ok(Fetched {
            path: target,
            sha256,
            source: FetchSource::Cache,
        });
    }

    let mut looked_in = vec![target.clone()];
    if let Some(dir) = &opts.torch_hub_dir {
        let path = dir.join(&name);
        if let Some(sha256) = check_torch_hub(&path, prefix).await {
            tracing::info!(path = %path.display(), "using torch.hub's cached file");
            return Ok(Fetched {
                path,
                sha256,
                source: FetchSource::TorchHub,
            });
        }
        looked_in.push(path);
    }

    if opts.offline {
        return Err(FetchError::Offline {
            url: url.to_owned(),
            looked_in,
            target,
        });
    }

    download(url, &name, prefix, &target, opts).await
}

/// The cache file name for `url`: its last path segment, checked to be a plain file name.
fn file_name_from_url(url: &str) -> Result<String, FetchError> {
    let invalid = |reason: String| FetchError::InvalidUrl {
        url: url.to_owned(),
        reason,
    };
    if !is_http_url(url) {
        return Err(invalid(
            "only http:// and https:// URLs can be fetched".into(),
        ));
    }
    let parsed = reqwest::Url::parse(url).map_err(|e| invalid(e.to_string()))?;
    let name = parsed
        .path_segments()
        .and_then(|mut segments| segments.next_back())
        .unwrap_or("");
    if name.is_empty() {
        return Err(invalid("the URL path does not end in a file name".into()));
    }
    if name == "." || name.contains("..") || name.contains('/') || name.contains('\\') {
        return Err(invalid(format!("unsafe file name {name:?}")));
    }
    Ok(name.to_owned())
}

/// Our cache: `Some(sha256)` on a usable hit; a file failing its hash prefix is deleted.
async fn check_cached(path: &Path, prefix: Option<&str>) -> Result<Option<String>, FetchError> {
    match tokio::fs::metadata(path).await {
        Ok(meta) if meta.is_file() => {}
        Ok(_) => return Ok(None),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(cause) => return Err(io_error("reading", path, cause)),
    }
    let sha256 = hash_blocking(path)
        .await
        .map_err(|cause| io_error("hashing", path, cause))?;
    match prefix {
        Some(p) if !sha256.starts_with(p) => {
            tracing::warn!(
                path = %path.display(),
                expected = p,
                got = %sha256,
                "cached file fails its hash check; deleting it and downloading again"
            );
            tokio::fs::remove_file(path)
                .await
                .map_err(|cause| io_error("deleting bad cache file", path, cause))?;
            Ok(None)
        }
        _ => Ok(Some(sha256)),
    }
}

/// torch.hub's folder: `Some(sha256)` on a usable hit. Never fails, never modifies anything.
async fn check_torch_hub(path: &Path, prefix: Option<&str>) -> Option<String> {
    match tokio::fs::metadata(path).await {
        Ok(meta) if meta.is_file() => {}
        _ => return None,
    }
    let sha256 = match hash_blocking(path).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read torch.hub's file; ignoring it");
            return None;
        }
    };
    match prefix {
        Some(p) if !sha256.starts_with(p) => {
            tracing::warn!(
                path = %path.display(),
                expected = p,
                got = %sha256,
                "torch.hub's file fails its hash check; ignoring it"
            );
            None
        }
        _ => Some(sha256),
    }
}

/// [`sha256_file`] off the async threads.
async fn hash_blocking(path: &Path) -> io::Result<String> {
    let owned = path.to_path_buf();
    tokio::task::spawn_blocking(move || sha256_file(&owned))
        .await
        .map_err(io::Error::other)?
}

/// Download with retries and exponential backoff.
async fn download(
    url: &str,
    name: &str,
    prefix: Option<&str>,
    target: &Path,
    opts: &FetchOptions,
) -> Result<Fetched, FetchError> {
    tokio::fs::create_dir_all(&opts.checkpoints_dir)
        .await
        .map_err(|cause| io_error("creating directory", &opts.checkpoints_dir, cause))?;
    let client = reqwest::Client::builder()
        .connect_timeout(opts.connect_timeout)
        .read_timeout(opts.read_timeout)
        .user_agent(USER_AGENT)
        .build()
        .map_err(|cause| FetchError::Client { cause })?;

    let mut attempt: u32 = 0;
    loop {
        match download_once(&client, url, name, prefix, target, opts).await {
            Ok(fetched) => return Ok(fetched),
            Err(e) if attempt < opts.retries && e.is_retryable() => {
                let delay = opts
                    .backoff
                    .saturating_mul(2u32.saturating_pow(attempt.min(31)));
                attempt += 1;
                tracing::warn!(
                    error = %e,
                    "download attempt {attempt} of {} failed; retrying in {delay:?}",
                    opts.retries + 1
                );
                tokio::time::sleep(delay).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// One download attempt into a `.partial` file, renamed to `target` once verified.
/// On any error the partial file is removed when `tmp` drops.
async fn download_once(
    client: &reqwest::Client,
    url: &str,
    name: &str,
    prefix: Option<&str>,
    target: &Path,
    opts: &FetchOptions,
) -> Result<Fetched, FetchError> {
    // The URL is in our message already; drop reqwest's copy of it.
    let network = |cause: reqwest::Error| FetchError::Network {
        url: url.to_owned(),
        cause: cause.without_url(),
    };
    let start = Instant::now();
    let mut response = client.get(url).send().await.map_err(network)?;
    let status = response.status();
    if !status.is_success() {
        return Err(FetchError::HttpStatus {
            url: url.to_owned(),
            status,
        });
    }
    let expected = response.content_length();

    let dir = &opts.checkpoints_dir;
    let mut builder = tempfile::Builder::new();
    let prefix_name = format!("{name}.");
    builder.prefix(&prefix_name).suffix(".partial");
    #[cfg(unix)]
    {
        // Normal permissions (umask applies), like torch.hub; tempfile's default is 0600.
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(std::fs::Permissions::from_mode(0o666));
    }
    let tmp = builder
        .tempfile_in(dir)
        .map_err(|cause| io_error("creating temporary file in", dir, cause))?;
    let tmp_path = tmp.path().to_path_buf();
    let write_err = |cause| io_error("writing", &tmp_path, cause);
    let std_file = tmp.as_file().try_clone().map_err(write_err)?;
    let mut out = tokio::io::BufWriter::with_capacity(CHUNK, tokio::fs::File::from_std(std_file));

    let mut progress = Progress::start(opts.progress, url, name, expected);
    let mut hasher = Sha256::new();
    let mut got: u64 = 0;
    loop {
        match response.chunk().await {
            Ok(Some(bytes)) => {
                hasher.update(&bytes);
                out.write_all(&bytes).await.map_err(write_err)?;
                got += bytes.len() as u64;
                progress.update(got);
            }
            Ok(None) => break,
            Err(cause) => {
                return Err(match expected {
                    Some(expected) if got < expected && !cause.is_timeout() => {
                        tracing::debug!(error = %error_chain(&cause), "body ended early");
                        FetchError::Truncated {
                            url: url.to_owned(),
                            expected,
                            got,
                        }
                    }
                    _ => network(cause),
                });
            }
        }
    }
    if let Some(expected) = expected {
        if got < expected {
            return Err(FetchError::Truncated {
                url: url.to_owned(),
                expected,
                got,
            });
        }
    }
    out.flush().await.map_err(write_err)?;
    out.get_mut().sync_all().await.map_err(write_err)?;
    drop(out);

    let sha256 = to_hex(&hasher.finalize());
    if let Some(p) = prefix {
        if !sha256.starts_with(p) {
            return Err(FetchError::HashMismatch {
                url: url.to_owned(),
                expected: p.to_owned(),
                got: sha256,
            });
        }
    }
    tmp.persist(target)
        .map_err(|e| io_error("renaming the download to", target, e.error))?;
    sync_dir(dir);
    progress.finish();
    tracing::info!(
        url,
        path = %target.display(),
        bytes = got,
        sha256 = %sha256,
        seconds = format!("{:.2}", start.elapsed().as_secs_f64()),
        "download complete"
    );
    Ok(Fetched {
        path: target.to_path_buf(),
        sha256,
        source: FetchSource::Download,
    })
}

/// Best-effort fsync of a directory so the rename survives a crash.
fn sync_dir(dir: &Path) {
    #[cfg(unix)]
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    #[cfg(not(unix))]
    let _ = dir;
}

/// Progress reporting: an indicatif bar, or log lines at start and every ~10 %.
struct Progress {
    bar: Option<ProgressBar>,
    total: Option<u64>,
    next_percent: u64,
    name: String,
}

impl Progress {
    fn start(show_bar: bool, url: &str, name: &str, total: Option<u64>) -> Self {
        let bar = show_bar.then(|| {
            let (bar, template) = match total {
                Some(n) => (
                    ProgressBar::new(n),
                    "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
                ),
                None => (
                    ProgressBar::new_spinner(),
                    "{spinner} {msg} {bytes} {binary_bytes_per_sec}",
                ),
            };
            if let Ok(style) = ProgressStyle::with_template(template) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_message(name.to_owned());
            bar
        });
        match total {
            Some(n) => tracing::info!(url, bytes = n, "downloading"),
            None => tracing::info!(url, "downloading (size unknown)"),
        }
        Self {
            bar,
            total,
            next_percent: 10,
            name: name.to_owned(),
        }
    }

    fn update(&mut self, done: u64) {
        if let Some(bar) = &self.bar {
            bar.set_position(done);
            return;
        }
        let Some(total) = self.total.filter(|&t| t > 0) else {
            return;
        };
        let percent = done.saturating_mul(100) / total;
        if percent >= self.next_percent && percent < 100 {
            tracing::info!(
                file = %self.name,
                "{percent}% ({done} of {total} bytes)"
            );
            self.next_percent = (percent / 10 + 1) * 10;
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        // Reached only on failure or cancellation: leave the bar where it stopped.
        if let Some(bar) = self.bar.take() {
            bar.abandon();
        }
    }
}

fn io_error(action: &'static str, path: &Path, cause: io::Error) -> FetchError {
    FetchError::Io {
        action,
        path: path.to_path_buf(),
        cause,
    }
}

/// An error and its sources, joined by ": ", skipping repeats.
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = vec![err.to_string()];
    let mut source = err.source();
    while let Some(e) = source {
        let s = e.to_string();
        if parts.last() != Some(&s) {
            parts.push(s);
        }
        source = e.source();
    }
    parts.join(": ")
}

fn display_paths(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn to_hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        s.push(HEX[usize::from(b >> 4)] as char);
        s.push(HEX[usize::from(b & 0x0f)] as char);
    }
    s
}
