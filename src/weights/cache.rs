//! Where cached files live: our own cache root, and torch.hub's checkpoint folder.
//!
//! The public functions read the process environment; the `*_from` variants take the
//! environment values as arguments so they can be tested without touching the environment.
//! Empty environment values are treated as unset.

use std::ffi::OsString;
use std::path::PathBuf;

/// Name of our folder under the XDG cache / `~/.cache`.
const APP_DIR: &str = "diracnet";

/// Cache root when no explicit one is given: `$XDG_CACHE_HOME/diracnet`, else
/// `~/.cache/diracnet`, else (no home directory at all) `<system temp dir>/diracnet`.
///
/// An explicit root (`--cache-dir` / `DIRACNET_CACHE`) replaces it; the CLI decides.
pub fn default_cache_dir() -> PathBuf {
    default_cache_dir_from(env_var("XDG_CACHE_HOME"), home_var())
        .unwrap_or_else(|| std::env::temp_dir().join(APP_DIR))
}

/// [`default_cache_dir`] with explicit `XDG_CACHE_HOME` and home values; `None` if neither is set.
pub fn default_cache_dir_from(
    xdg_cache_home: Option<OsString>,
    home: Option<OsString>,
) -> Option<PathBuf> {
    cache_base(xdg_cache_home, home).map(|base| base.join(APP_DIR))
}

/// torch.hub's checkpoint folder: `$TORCH_HOME/hub/checkpoints`, else
/// `$XDG_CACHE_HOME/torch/hub/checkpoints`, else `~/.cache/torch/hub/checkpoints`.
/// `None` if no home can be found.
pub fn torch_hub_checkpoints_dir() -> Option<PathBuf> {
    torch_hub_checkpoints_dir_from(env_var("TORCH_HOME"), env_var("XDG_CACHE_HOME"), home_var())
}

/// [`torch_hub_checkpoints_dir`] with explicit `TORCH_HOME`, `XDG_CACHE_HOME` and home values.
pub fn torch_hub_checkpoints_dir_from(
    torch_home: Option<OsString>,
    xdg_cache_home: Option<OsString>,
    home: Option<OsString>,
) -> Option<PathBuf> {
    let torch_home = match non_empty(torch_home) {
        Some(t) => PathBuf::from(t),
        None => cache_base(xdg_cache_home, home)?.join("torch"),
    };
    Some(torch_home.join("hub").join("checkpoints"))
}

/// Layout inside the cache root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheLayout {
    /// The cache root.
    pub root: PathBuf,
}

impl CacheLayout {
    /// A layout rooted at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// Downloaded checkpoints: `<root>/checkpoints`.
    pub fn checkpoints(&self) -> PathBuf {
        self.root.join("checkpoints")
    }

    /// Converted safetensors: `<root>/converted`.
    pub fn converted(&self) -> PathBuf {
        self.root.join("converted")
    }
}

/// `$XDG_CACHE_HOME`, else `<home>/.cache`.
fn cache_base(xdg_cache_home: Option<OsString>, home: Option<OsString>) -> Option<PathBuf> {
    match non_empty(xdg_cache_home) {
        Some(x) => Some(PathBuf::from(x)),
        None => non_empty(home).map(|h| PathBuf::from(h).join(".cache")),
    }
}

fn non_empty(v: Option<OsString>) -> Option<OsString> {
    v.filter(|s| !s.is_empty())
}

fn env_var(name: &str) -> Option<OsString> {
    non_empty(std::env::var_os(name))
}

/// The user's home directory from the environment (`HOME`, or `USERPROFILE` on Windows).
fn home_var() -> Option<OsString> {
    let home = env_var("HOME");
    if cfg!(windows) {
        home.or_else(|| env_var("USERPROFILE"))
    } else {
        home
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &str) -> Option<OsString> {
        Some(OsString::from(v))
    }

    #[test]
    fn default_cache_prefers_xdg() {
        assert_eq!(
            default_cache_dir_from(s("/x"), s("/home/u")),
            Some(PathBuf::from("/x/diracnet"))
        );
        assert_eq!(
            default_cache_dir_from(None, s("/home/u")),
            Some(PathBuf::from("/home/u/.cache/diracnet"))
        );
        assert_eq!(
            default_cache_dir_from(s(""), s("/home/u")),
            Some(PathBuf::from("/home/u/.cache/diracnet"))
        );
        assert_eq!(default_cache_dir_from(None, None), None);
    }

    #[test]
    fn torch_hub_dir_order() {
        assert_eq!(
            torch_hub_checkpoints_dir_from(s("/t"), s("/x"), s("/home/u")),
            Some(PathBuf::from("/t/hub/checkpoints"))
        );
        assert_eq!(
            torch_hub_checkpoints_dir_from(None, s("/x"), s("/home/u")),
            Some(PathBuf::from("/x/torch/hub/checkpoints"))
        );
        assert_eq!(
            torch_hub_checkpoints_dir_from(s(""), None, s("/home/u")),
            Some(PathBuf::from("/home/u/.cache/torch/hub/checkpoints"))
        );
        assert_eq!(torch_hub_checkpoints_dir_from(None, None, None), None);
    }

    #[test]
    fn layout() {
        let l = CacheLayout::new("/c");
        assert_eq!(l.checkpoints(), PathBuf::from("/c/checkpoints"));
        assert_eq!(l.converted(), PathBuf::from("/c/converted"));
    }
}
