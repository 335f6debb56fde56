//! What the binary says about itself: the `DIRACNET_*` env twins of `diracnet serve`'s flags and
//! their defaults, and the metric families the server declares.

use std::{
    collections::{BTreeMap, BTreeSet},
    process::Command,
};

use crate::files::read;

pub fn diracnet() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_diracnet"));
    for (k, _) in std::env::vars() {
        if k.starts_with("DIRACNET_") {
            cmd.env_remove(k);
        }
    }
    cmd
}

pub struct Flags {
    /// Every `DIRACNET_*` env twin of a `serve` flag, with its default when it has one.
    env: BTreeMap<String, Option<String>>,
}

impl Flags {
    pub fn of_serve() -> Self {
        let out = diracnet().args(["serve", "--help"]).output().unwrap();
        assert!(out.status.success(), "diracnet serve --help failed");
        let help = String::from_utf8(out.stdout).unwrap();
        let flat = help.split_whitespace().collect::<Vec<_>>().join(" ");
        let mut env = BTreeMap::new();
        for (i, m) in flat.match_indices("[env: ") {
            let rest = &flat[i + m.len()..];
            let name_end = rest.find(['=', ']']).unwrap();
            let name = rest[..name_end].to_string();
            let after = &rest[rest.find(']').unwrap() + 1..];
            let default = after
                .trim_start()
                .strip_prefix("[default: ")
                .map(|d| d[..d.find(']').unwrap()].to_string());
            env.insert(name, default);
        }
        assert!(
            env.contains_key("DIRACNET_PORT") && env.contains_key("DIRACNET_SHUTDOWN_TIMEOUT_S"),
            "could not read the env twins from `diracnet serve --help`:\n{help}"
        );
        Self { env }
    }

    fn default(&self, name: &str) -> String {
        self.env[name]
            .clone()
            .unwrap_or_else(|| panic!("{name} has no default in `diracnet serve --help`"))
    }

    pub fn port(&self) -> u16 {
        self.default("DIRACNET_PORT").parse().unwrap()
    }

    pub fn assert_known(&self, name: &str, whose: &str) {
        if name.starts_with("DIRACNET_") {
            assert!(
                self.env.contains_key(name),
                "{whose}: {name} is not an env twin of any `diracnet serve` flag"
            );
        }
    }

    /// The drain bound in effect given a container's env.
    pub fn shutdown_timeout(&self, env: &BTreeMap<String, String>) -> u64 {
        env.get("DIRACNET_SHUTDOWN_TIMEOUT_S")
            .cloned()
            .unwrap_or_else(|| self.default("DIRACNET_SHUTDOWN_TIMEOUT_S"))
            .parse()
            .unwrap()
    }
}

/// Metric families named in `src/server/metrics.rs` (namespace `diracnet` + name).
pub fn declared_metrics() -> BTreeSet<String> {
    let src = read("src/server/metrics.rs");
    assert!(src.contains(".namespace(\"diracnet\")"));
    let mut names = BTreeSet::new();
    for line in src.lines() {
        let t = line.trim().trim_start_matches("Opts::new(").trim_start();
        if let Some(rest) = t.strip_prefix('"') {
            let name = &rest[..rest.find('"').unwrap()];
            if !name.is_empty() && name.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
                names.insert(format!("diracnet_{name}"));
            }
        }
    }
    names
}
