//! The deployment files (`Dockerfile`, `docker/`, `docker/k8s/`) against the code, offline and
//! without a Docker engine or a cluster: they parse, and what they name exists. Env variables
//! are flags of `diracnet serve`, ports and the shutdown timeout are the binary's defaults, the
//! grace periods outlast the drain, every probe path answers 200 from a real `diracnet serve`,
//! and the metrics the autoscaler reads are exported.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use yaml_rust2::{Yaml, YamlLoader};

// ---------------------------------------------------------------------------------------------
// Files

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
}

/// All documents of a YAML file, with `<<` merge keys applied.
fn yaml(rel: &str) -> Vec<Yaml> {
    YamlLoader::load_from_str(&read(rel))
        .unwrap_or_else(|e| panic!("{rel}: invalid YAML: {e}"))
        .into_iter()
        .map(merge_keys)
        .collect()
}

fn merge_keys(node: Yaml) -> Yaml {
    match node {
        Yaml::Hash(h) => {
            let mut out = yaml_rust2::yaml::Hash::new();
            let merge = Yaml::String("<<".into());
            if let Some(Yaml::Hash(base)) = h.get(&merge) {
                for (k, v) in base {
                    out.insert(k.clone(), merge_keys(v.clone()));
                }
            }
            for (k, v) in h {
                if k != merge {
                    out.insert(k, merge_keys(v));
                }
            }
            Yaml::Hash(out)
        }
        Yaml::Array(a) => Yaml::Array(a.into_iter().map(merge_keys).collect()),
        other => other,
    }
}

fn present(node: &Yaml) -> bool {
    !node.is_badvalue() && !node.is_null()
}

fn s(node: &Yaml) -> String {
    match node {
        Yaml::String(v) | Yaml::Real(v) => v.clone(),
        Yaml::Integer(i) => i.to_string(),
        Yaml::Boolean(b) => b.to_string(),
        other => panic!("expected a scalar, found {other:?}"),
    }
}

fn int(node: &Yaml) -> i64 {
    match node {
        Yaml::Integer(i) => *i,
        Yaml::String(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("not an integer: {v:?}")),
        other => panic!("expected an integer, found {other:?}"),
    }
}

fn items(node: &Yaml) -> &[Yaml] {
    node.as_vec().map(Vec::as_slice).unwrap_or(&[])
}

fn entries(node: &Yaml) -> Vec<(String, &Yaml)> {
    node.as_hash()
        .map(|h| h.iter().map(|(k, v)| (s(k), v)).collect())
        .unwrap_or_default()
}

/// Paths of the `http://` URLs in `text` (`http://127.0.0.1:${PORT}/healthz` → `/healthz`).
fn url_paths(text: &str) -> Vec<String> {
    text.match_indices("http://")
        .map(|(i, m)| {
            let rest = &text[i + m.len()..];
            let end = rest
                .find(|c: char| c.is_whitespace() || c == '"' || c == '\'')
                .unwrap_or(rest.len());
            let url = &rest[..end];
            url.find('/').map_or("/".into(), |p| url[p..].to_string())
        })
        .collect()
}

/// Seconds of a Go/Compose duration such as `30s`, `1m30s` or `45`.
fn seconds(text: &str) -> u64 {
    let (mut total, mut num) = (0u64, String::new());
    for c in text.chars() {
        if c.is_ascii_digit() {
            num.push(c);
        } else {
            let n: u64 = num
                .parse()
                .unwrap_or_else(|_| panic!("bad duration {text:?}"));
            num.clear();
            total += n * match c {
                'h' => 3600,
                'm' => 60,
                's' => 1,
                _ => panic!("bad duration {text:?}"),
            };
        }
    }
    if !num.is_empty() {
        total += num.parse::<u64>().unwrap();
    }
    total
}

// ---------------------------------------------------------------------------------------------
// What the binary says about itself

fn diracnet() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_diracnet"));
    for (k, _) in std::env::vars() {
        if k.starts_with("DIRACNET_") {
            cmd.env_remove(k);
        }
    }
    cmd
}

struct Flags {
    /// Every `DIRACNET_*` env twin of a `serve` flag, with its default when it has one.
    env: BTreeMap<String, Option<String>>,
}

impl Flags {
    fn of_serve() -> Self {
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

    fn port(&self) -> u16 {
        self.default("DIRACNET_PORT").parse().unwrap()
    }

    fn assert_known(&self, name: &str, whose: &str) {
        if name.starts_with("DIRACNET_") {
            assert!(
                self.env.contains_key(name),
                "{whose}: {name} is not an env twin of any `diracnet serve` flag"
            );
        }
    }

    /// The drain bound in effect given a container's env.
    fn shutdown_timeout(&self, env: &BTreeMap<String, String>) -> u64 {
        env.get("DIRACNET_SHUTDOWN_TIMEOUT_S")
            .cloned()
            .unwrap_or_else(|| self.default("DIRACNET_SHUTDOWN_TIMEOUT_S"))
            .parse()
            .unwrap()
    }
}

/// Metric families named in `src/server/metrics.rs` (namespace `diracnet` + name).
fn declared_metrics() -> BTreeSet<String> {
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

// ---------------------------------------------------------------------------------------------
// Dockerfiles

struct Instruction {
    line: usize,
    keyword: String,
    args: String,
}

fn dockerfile(rel: &str) -> Vec<Instruction> {
    let text = read(rel);
    let mut out = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (n, raw) in text.lines().enumerate() {
        let trimmed = raw.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_none()) {
            continue; // comments (also inside continuations) and parser directives
        }
        let (start, mut buf) = current.take().unwrap_or((n + 1, String::new()));
        let continued = trimmed.ends_with('\\');
        buf.push_str(trimmed.trim_end_matches('\\'));
        buf.push(' ');
        if continued {
            current = Some((start, buf));
        } else {
            let buf = buf.trim();
            let (kw, args) = buf.split_once(char::is_whitespace).unwrap_or((buf, ""));
            out.push(Instruction {
                line: start,
                keyword: kw.to_ascii_uppercase(),
                args: args.trim().to_string(),
            });
        }
    }
    assert!(current.is_none(), "{rel}: ends inside a line continuation");
    const KNOWN: &[&str] = &[
        "FROM",
        "ARG",
        "ENV",
        "RUN",
        "COPY",
        "ADD",
        "WORKDIR",
        "USER",
        "EXPOSE",
        "VOLUME",
        "LABEL",
        "HEALTHCHECK",
        "ENTRYPOINT",
        "CMD",
        "SHELL",
        "STOPSIGNAL",
        "ONBUILD",
    ];
    for i in &out {
        assert!(
            KNOWN.contains(&i.keyword.as_str()),
            "{rel}:{}: unknown instruction {}",
            i.line,
            i.keyword
        );
    }
    out
}

/// `${NAME}`, `${NAME:-x}` and `$NAME` references.
fn var_refs(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let b = text.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'$' {
            let braced = b.get(i + 1) == Some(&b'{');
            let start = i + 1 + usize::from(braced);
            let mut j = start;
            while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_') {
                j += 1;
            }
            if j > start {
                out.push(text[start..j].to_string());
            }
            i = j.max(i + 1);
        } else {
            i += 1;
        }
    }
    out
}

fn json_array(args: &str, what: &str) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_str(args)
        .unwrap_or_else(|e| panic!("{what} is not in JSON (exec) form: {args}: {e}"));
    v.as_array()
        .unwrap_or_else(|| panic!("{what}: not an array"))
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect()
}

/// `--flag=value` options in front of COPY's sources, and the rest.
fn copy_parts(args: &str) -> (BTreeMap<String, String>, Vec<String>) {
    let mut opts = BTreeMap::new();
    let mut rest = Vec::new();
    for w in args.split_whitespace() {
        if let Some(opt) = w.strip_prefix("--") {
            let (k, v) = opt.split_once('=').unwrap_or((opt, ""));
            opts.insert(k.to_string(), v.to_string());
        } else {
            rest.push(w.to_string());
        }
    }
    (opts, rest)
}

/// Does a `.dockerignore` pattern exclude `path`? (Enough of Docker's matching for this
/// repository: `*` within a segment, a leading `**/`, and a directory excluding what is in it.)
fn ignored(patterns: &[String], path: &str) -> bool {
    fn glob(p: &str, s: &str) -> bool {
        match p.split_once('*') {
            None => p == s,
            Some((pre, post)) => {
                s.starts_with(pre)
                    && (pre.len()..=s.len())
                        .any(|i| !s[pre.len()..i].contains('/') && glob(post, &s[i..]))
            }
        }
    }
    let mut excluded = false;
    for raw in patterns {
        let (negate, pat) = match raw.strip_prefix('!') {
            Some(p) => (true, p),
            None => (false, raw.as_str()),
        };
        let pat = pat.trim_start_matches("./").trim_end_matches('/');
        let segments: Vec<&str> = path.split('/').collect();
        let prefixes = (1..=segments.len()).map(|n| segments[..n].join("/"));
        let hit = prefixes.into_iter().any(|p| {
            glob(pat, &p)
                || pat.strip_prefix("**/").is_some_and(|tail| {
                    p.split('/').enumerate().any(|(i, _)| {
                        glob(tail, &p.split('/').skip(i).collect::<Vec<_>>().join("/"))
                    })
                })
        });
        if hit {
            excluded = !negate;
        }
    }
    excluded
}

struct ImageFacts {
    env: BTreeMap<String, String>,
    healthcheck_paths: Vec<String>,
}

/// Checks one Dockerfile; `flavour` is the docker/build.sh argument its build must use.
fn check_dockerfile(rel: &str, flavour: &str, flags: &Flags) -> ImageFacts {
    let ins = dockerfile(rel);
    let at = |i: &Instruction| format!("{rel}:{}", i.line);

    // Global ARGs, then stages.
    let mut global_args = BTreeSet::new();
    let mut stages: Vec<(String, Vec<&Instruction>)> = Vec::new();
    for i in &ins {
        if i.keyword == "FROM" {
            let words: Vec<&str> = i.args.split_whitespace().collect();
            let name = match words.as_slice() {
                [_, as_, name] if as_.eq_ignore_ascii_case("as") => name.to_string(),
                [_] => format!("#{}", stages.len()),
                _ => panic!("{}: malformed FROM {}", at(i), i.args),
            };
            for v in var_refs(words[0]) {
                assert!(
                    global_args.contains(&v),
                    "{}: FROM uses ${v}, which no ARG before the first FROM declares",
                    at(i)
                );
            }
            assert!(
                !stages.iter().any(|(n, _)| *n == name),
                "{}: stage {name} twice",
                at(i)
            );
            stages.push((name, Vec::new()));
        } else if let Some((_, body)) = stages.last_mut() {
            body.push(i);
        } else {
            assert_eq!(i.keyword, "ARG", "{}: only ARG may precede FROM", at(i));
            global_args.insert(i.args.split('=').next().unwrap().trim().to_string());
        }
    }
    assert!(
        stages.len() >= 2,
        "{rel}: expected a build and a runtime stage"
    );

    // COPY sources: earlier stages, or files of the repository inside the build context.
    let ignore: Vec<String> = read(".dockerignore")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect();
    let mut copied = BTreeSet::new();
    for (idx, (_, body)) in stages.iter().enumerate() {
        for i in body
            .iter()
            .filter(|i| i.keyword == "COPY" || i.keyword == "ADD")
        {
            let (opts, parts) = copy_parts(&i.args);
            assert!(
                parts.len() >= 2,
                "{}: COPY needs a source and a target",
                at(i)
            );
            if let Some(from) = opts.get("from") {
                assert!(
                    stages[..idx].iter().any(|(n, _)| n == from),
                    "{}: COPY --from={from}: no earlier stage has that name",
                    at(i)
                );
                continue;
            }
            for src in &parts[..parts.len() - 1] {
                let src = src.trim_start_matches("./").trim_end_matches('/');
                assert!(
                    root().join(src).exists(),
                    "{}: COPY source {src} does not exist",
                    at(i)
                );
                assert!(
                    !ignored(&ignore, src),
                    "{}: COPY source {src} is excluded by .dockerignore",
                    at(i)
                );
                copied.insert(src.to_string());
            }
        }
    }

    // Everything `cargo build --bin diracnet` reads is copied: the lib and bin paths, build.rs
    // and what build.rs embeds (models/).
    let manifest: toml::Table = read("Cargo.toml").parse().unwrap();
    let mut needed = vec![
        "Cargo.toml".to_string(),
        "Cargo.lock".into(),
        "build.rs".into(),
        "src/main.rs".into(),
        "models/imagenet_classes.txt".into(),
        "docker/build.sh".into(),
    ];
    for section in ["lib", "bin"] {
        let targets = match manifest.get(section) {
            Some(toml::Value::Table(t)) => vec![t.clone()],
            Some(toml::Value::Array(a)) => a.iter().filter_map(|v| v.as_table().cloned()).collect(),
            _ => vec![],
        };
        for t in targets {
            if let Some(p) = t.get("path").and_then(|p| p.as_str()) {
                needed.push(p.to_string());
            }
        }
    }
    for path in needed {
        assert!(
            copied
                .iter()
                .any(|c| path == *c || path.starts_with(&format!("{c}/"))),
            "{rel}: the build needs {path}, which no COPY brings in"
        );
    }

    // The build runs the shared script, with the tools the manifest's features need.
    let (_, build) = &stages[stages.len() - 2];
    if read("Cargo.toml").contains("nasm_simd") {
        assert!(
            build.iter().any(|i| i.keyword == "RUN"
                && i.args.contains("install")
                && i.args.contains("nasm")),
            "{rel}: mozjpeg-sys' `nasm_simd` needs nasm installed in the build stage"
        );
    }
    assert!(
        build
            .iter()
            .any(|i| i.keyword == "RUN" && i.args.contains(&format!("docker/build.sh {flavour}"))),
        "{rel}: the build stage must run `docker/build.sh {flavour}`"
    );

    // The runtime stage.
    let (_, run) = stages.last().unwrap();
    let last = |kw: &str| run.iter().rev().find(|i| i.keyword == kw).copied();
    let mut env = BTreeMap::new();
    for i in run.iter().filter(|i| i.keyword == "ENV") {
        for pair in i.args.split_whitespace() {
            let (k, v) = pair
                .split_once('=')
                .unwrap_or_else(|| panic!("{}: use ENV KEY=VALUE", at(i)));
            flags.assert_known(k, &at(i));
            env.insert(k.to_string(), v.trim_matches('"').to_string());
        }
    }
    let port = flags.port().to_string();
    assert_eq!(env.get("DIRACNET_CACHE").map(String::as_str), Some("/data"));
    assert_eq!(
        env.get("DIRACNET_PORT"),
        Some(&port),
        "{rel}: DIRACNET_PORT"
    );
    let volume = last("VOLUME").unwrap_or_else(|| panic!("{rel}: no VOLUME"));
    assert!(
        volume.args.contains("/data"),
        "{}: VOLUME /data",
        at(volume)
    );
    let expose = last("EXPOSE").unwrap_or_else(|| panic!("{rel}: no EXPOSE"));
    assert_eq!(expose.args.trim_end_matches("/tcp"), port, "{}", at(expose));
    let user = last("USER").unwrap_or_else(|| panic!("{rel}: runs as root (no USER)"));
    let uid = user.args.split(':').next().unwrap();
    assert!(
        uid.parse::<u32>().is_ok_and(|u| u != 0),
        "{}: USER must be a numeric non-root uid (Kubernetes' runAsNonRoot checks it)",
        at(user)
    );
    let entry = last("ENTRYPOINT").unwrap_or_else(|| panic!("{rel}: no ENTRYPOINT"));
    assert_eq!(
        json_array(&entry.args, "ENTRYPOINT"),
        ["diracnet"],
        "{}",
        at(entry)
    );
    let cmd = last("CMD").unwrap_or_else(|| panic!("{rel}: no CMD"));
    assert_eq!(json_array(&cmd.args, "CMD"), ["serve"], "{}", at(cmd));
    let health = last("HEALTHCHECK").unwrap_or_else(|| panic!("{rel}: no HEALTHCHECK"));
    let healthcheck_paths = url_paths(&health.args);
    assert_eq!(healthcheck_paths, ["/healthz"], "{}", at(health));
    ImageFacts {
        env,
        healthcheck_paths,
    }
}

// ---------------------------------------------------------------------------------------------
// Kubernetes

struct Probes {
    /// Paths that must answer 200 once the server is ready.
    paths: BTreeSet<String>,
}

/// `name: value` pairs of a container's env (valueFrom entries have no value).
fn container_env(c: &Yaml, whose: &str, flags: &Flags) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for e in items(&c["env"]) {
        let name = s(&e["name"]);
        flags.assert_known(&name, whose);
        if present(&e["value"]) {
            env.insert(name, s(&e["value"]));
        }
    }
    env
}

/// Checks a pod template's serving container; returns its probe paths.
fn check_pod(pod: &Yaml, container: &Yaml, whose: &str, flags: &Flags, probes: &mut Probes) {
    let env = container_env(container, whose, flags);
    let port = env
        .get("DIRACNET_PORT")
        .map_or_else(|| flags.port(), |p| p.parse().unwrap());
    let ports: Vec<(Option<String>, i64)> = items(&container["ports"])
        .iter()
        .map(|p| {
            (
                present(&p["name"]).then(|| s(&p["name"])),
                int(&p["containerPort"]),
            )
        })
        .collect();
    assert!(
        ports.iter().any(|(_, n)| *n == i64::from(port)),
        "{whose}: no containerPort {port}"
    );
    let resolve = |p: &Yaml| -> i64 {
        match p {
            Yaml::Integer(n) => *n,
            Yaml::String(name) => {
                ports
                    .iter()
                    .find(|(n, _)| n.as_deref() == Some(name))
                    .unwrap_or_else(|| panic!("{whose}: no port named {name}"))
                    .1
            }
            other => panic!("{whose}: bad port {other:?}"),
        }
    };
    assert_eq!(
        env.get("DIRACNET_CACHE").map(String::as_str),
        Some("/data"),
        "{whose}: DIRACNET_CACHE"
    );
    assert!(
        items(&container["volumeMounts"])
            .iter()
            .any(|m| s(&m["mountPath"]) == "/data"),
        "{whose}: nothing is mounted at /data (the weights cache)"
    );
    let gpu = &container["resources"]["limits"]["nvidia.com/gpu"];
    assert!(
        present(gpu) && int(gpu) >= 1,
        "{whose}: no nvidia.com/gpu limit"
    );

    let mut paths = BTreeMap::new();
    for kind in ["startupProbe", "readinessProbe", "livenessProbe"] {
        let probe = &container[kind];
        assert!(present(probe), "{whose}: no {kind}");
        let get = &probe["httpGet"];
        assert_eq!(
            resolve(&get["port"]),
            i64::from(port),
            "{whose}: {kind} port"
        );
        paths.insert(kind, s(&get["path"]));
        probes.paths.insert(s(&get["path"]));
    }
    // Liveness must not depend on the models: a pod still downloading them would be killed.
    assert!(
        ["/healthz", "/v2/health/live"].contains(&paths["livenessProbe"].as_str()),
        "{whose}: livenessProbe must probe /healthz or /v2/health/live, not {}",
        paths["livenessProbe"]
    );
    for kind in ["startupProbe", "readinessProbe"] {
        assert!(
            ["/readyz", "/v2/health/ready"].contains(&paths[kind].as_str()),
            "{whose}: {kind} must probe readiness (/readyz or /v2/health/ready)"
        );
    }
    let startup = &container["startupProbe"];
    let window = int(&startup["periodSeconds"]) * int(&startup["failureThreshold"]);
    assert!(
        window >= 300,
        "{whose}: the startup probe allows {window} s, too little for the first download"
    );

    // The grace period outlasts the preStop pause plus the drain.
    let pre_stop: i64 = {
        let cmd = items(&container["lifecycle"]["preStop"]["exec"]["command"]);
        match cmd {
            [sleep, secs] if s(sleep) == "sleep" => s(secs).parse().unwrap(),
            [] => 0,
            other => panic!("{whose}: unexpected preStop {other:?}"),
        }
    };
    let grace = &pod["terminationGracePeriodSeconds"];
    let grace = if present(grace) { int(grace) } else { 30 };
    let drain = i64::try_from(flags.shutdown_timeout(&env)).unwrap();
    assert!(
        grace > pre_stop + drain,
        "{whose}: terminationGracePeriodSeconds {grace} <= preStop {pre_stop} + shutdown timeout {drain}"
    );
}

fn check_prometheus_annotations(annotations: &Yaml, whose: &str, flags: &Flags) {
    assert_eq!(
        s(&annotations["prometheus.io/port"]),
        flags.port().to_string(),
        "{whose}"
    );
    assert_eq!(s(&annotations["prometheus.io/path"]), "/metrics", "{whose}");
}

/// Metric names an adapter rule reads from Prometheus, and the names it serves.
fn adapter_rules() -> (BTreeSet<String>, BTreeSet<String>) {
    let doc = &yaml("docker/k8s/prometheus-adapter.yaml")[0];
    let (mut reads, mut serves) = (BTreeSet::new(), BTreeSet::new());
    for rule in items(&doc["rules"]["custom"]) {
        let text = format!("{} {}", s(&rule["seriesQuery"]), s(&rule["metricsQuery"]));
        for w in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if w.starts_with("diracnet_") {
                reads.insert(w.to_string());
            }
        }
        serves.insert(s(&rule["name"]["as"]));
    }
    (reads, serves)
}

/// Strips a histogram's `_count`/`_sum`/`_bucket` suffix.
fn family(series: &str) -> &str {
    ["_count", "_sum", "_bucket"]
        .iter()
        .find_map(|suffix| series.strip_suffix(suffix))
        .unwrap_or(series)
}

fn all_probe_paths(flags: &Flags) -> BTreeSet<String> {
    let mut probes = Probes {
        paths: BTreeSet::new(),
    };
    for (rel, flavour) in [("Dockerfile", "cuda"), ("docker/cpu.Dockerfile", "cpu")] {
        probes
            .paths
            .extend(check_dockerfile(rel, flavour, flags).healthcheck_paths);
    }
    for doc in yaml("docker/compose.yaml") {
        for (_, svc) in entries(&doc["services"]) {
            probes.paths.extend(url_paths(&format!(
                "{:?}",
                items(&svc["healthcheck"]["test"])
                    .iter()
                    .map(s)
                    .collect::<Vec<_>>()
            )));
        }
    }
    for (rel, kind) in [
        ("docker/k8s/deployment.yaml", "Deployment"),
        ("docker/k8s/kserve.yaml", "InferenceService"),
    ] {
        for doc in yaml(rel) {
            assert_eq!(s(&doc["kind"]), kind);
            let (pod, container) = if kind == "Deployment" {
                let pod = &doc["spec"]["template"]["spec"];
                (pod.clone(), items(&pod["containers"])[0].clone())
            } else {
                let pod = &doc["spec"]["predictor"];
                (pod.clone(), items(&pod["containers"])[0].clone())
            };
            check_pod(&pod, &container, rel, flags, &mut probes);
        }
    }
    probes.paths
}

// ---------------------------------------------------------------------------------------------
// Tests: files

#[test]
fn dockerfiles_build_with_the_shared_script_and_run_as_documented() {
    let flags = Flags::of_serve();
    let gpu = check_dockerfile("Dockerfile", "cuda", &flags);
    assert_eq!(
        gpu.env.get("DIRACNET_DEVICE").map(String::as_str),
        Some("auto")
    );
    let dockerfile = read("Dockerfile");
    assert!(dockerfile.contains("-cudnn-devel-") && dockerfile.contains("-cudnn-runtime-"));
    check_dockerfile("docker/cpu.Dockerfile", "cpu", &flags);
    assert!(!read("docker/cpu.Dockerfile").contains("nvidia"));
}

#[test]
fn build_script_is_what_ci_can_run() {
    let script = read("docker/build.sh");
    assert!(script.starts_with("#!/usr/bin/env bash\n"));
    assert!(script.contains("--locked"));
    assert!(script.contains("cuda,cudnn"));
    #[cfg(unix)]
    for rel in [
        "docker/build.sh",
        "docker/entrypoint.sh",
        "scripts/cuda-toolchain.sh",
        "scripts/gpu-check.sh",
    ] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(root().join(rel))
            .unwrap()
            .permissions()
            .mode();
        assert!(mode & 0o111 != 0, "{rel} is not executable");
    }
}

#[test]
fn dockerignore_matching() {
    let pats: Vec<String> = ["target", "**/.venv", "*.pth", "bench/out", "!keep.pth"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert!(ignored(&pats, "target/release/diracnet"));
    assert!(ignored(&pats, "a/b/.venv/bin"));
    assert!(ignored(&pats, "x.pth"));
    assert!(!ignored(&pats, "keep.pth"));
    assert!(ignored(&pats, "bench/out/x"));
    assert!(!ignored(&pats, "bench/load.rs"));
    assert!(!ignored(&pats, "src"));
    assert_eq!(seconds("1m30s"), 90);
    assert_eq!(seconds("45"), 45);
    assert_eq!(
        url_paths(r#"curl http://127.0.0.1:${DIRACNET_PORT:-8080}/healthz || exit 1"#),
        ["/healthz"]
    );
}

#[test]
fn compose_file_matches_the_images_and_the_server() {
    let flags = Flags::of_serve();
    let docs = yaml("docker/compose.yaml");
    assert_eq!(docs.len(), 1);
    let doc = &docs[0];
    let services = entries(&doc["services"]);
    let names: Vec<&str> = services.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["diracnet", "diracnet-cpu"]);
    let volumes: Vec<String> = entries(&doc["volumes"])
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    for (name, svc) in &services {
        let whose = format!("compose service {name}");
        let build = &svc["build"];
        let context = Path::new("docker").join(s(&build["context"]));
        let dockerfile = context.join(s(&build["dockerfile"]));
        assert!(
            root().join(&dockerfile).is_file(),
            "{whose}: {dockerfile:?}"
        );
        assert_eq!(
            std::fs::canonicalize(root().join(&context)).unwrap(),
            std::fs::canonicalize(root()).unwrap(),
            "{whose}: the build context must be the repository root"
        );

        let port = flags.port().to_string();
        for p in items(&svc["ports"]) {
            let container = s(p).rsplit(':').next().unwrap().to_string();
            assert_eq!(
                container, port,
                "{whose}: publishes the wrong container port"
            );
        }
        let mounts: Vec<String> = items(&svc["volumes"]).iter().map(s).collect();
        assert!(
            mounts.iter().any(|m| {
                let (vol, target) = m.split_once(':').unwrap();
                target == "/data" && volumes.contains(&vol.to_string())
            }),
            "{whose}: a named volume must be mounted at /data: {mounts:?}"
        );
        let mut env = BTreeMap::new();
        for (k, v) in entries(&svc["environment"]) {
            flags.assert_known(&k, &whose);
            env.insert(k, s(v));
        }
        let grace = seconds(&s(&svc["stop_grace_period"]));
        assert!(
            grace > flags.shutdown_timeout(&env),
            "{whose}: stop_grace_period {grace} s must exceed the shutdown timeout"
        );
        let test: Vec<String> = items(&svc["healthcheck"]["test"]).iter().map(s).collect();
        assert_eq!(
            test.first().map(String::as_str),
            Some("CMD"),
            "{whose}: healthcheck"
        );
        assert!(
            seconds(&s(&svc["healthcheck"]["start_period"])) >= 60,
            "{whose}: the healthcheck's start_period must cover the first download"
        );

        let devices = items(&svc["deploy"]["resources"]["reservations"]["devices"]);
        if name == "diracnet" {
            assert!(
                devices.iter().any(|d| s(&d["driver"]) == "nvidia"
                    && items(&d["capabilities"]).iter().any(|c| s(c) == "gpu")),
                "{whose}: needs an NVIDIA GPU reservation"
            );
            assert_eq!(s(&build["dockerfile"]), "Dockerfile");
        } else {
            assert!(
                devices.is_empty(),
                "{whose}: the CPU service reserves no GPU"
            );
            assert!(items(&svc["profiles"]).iter().any(|p| s(p) == "cpu"));
        }
    }
}

#[test]
fn kubernetes_manifests_match_the_server() {
    let flags = Flags::of_serve();
    let port = i64::from(flags.port());
    // Probes, ports, grace periods, env (checked in check_pod).
    all_probe_paths(&flags);

    let deployment = &yaml("docker/k8s/deployment.yaml")[0];
    assert_eq!(s(&deployment["apiVersion"]), "apps/v1");
    let name = s(&deployment["metadata"]["name"]);
    let template = &deployment["spec"]["template"];
    let selector = entries(&deployment["spec"]["selector"]["matchLabels"]);
    for (k, v) in &selector {
        assert_eq!(
            &template["metadata"]["labels"][k.as_str()],
            *v,
            "selector {k}"
        );
    }
    let annotations = &template["metadata"]["annotations"];
    assert_eq!(s(&annotations["prometheus.io/scrape"]), "true");
    check_prometheus_annotations(annotations, "deployment.yaml", &flags);

    let service = &yaml("docker/k8s/service.yaml")[0];
    assert_eq!(s(&service["kind"]), "Service");
    for (k, v) in entries(&service["spec"]["selector"]) {
        assert_eq!(
            &template["metadata"]["labels"][k.as_str()],
            v,
            "service selector {k}"
        );
    }
    let container = &items(&template["spec"]["containers"])[0];
    for p in items(&service["spec"]["ports"]) {
        let target = &p["targetPort"];
        let ok = items(&container["ports"]).iter().any(|cp| {
            (int(&cp["containerPort"]) == port)
                && match target {
                    Yaml::Integer(n) => *n == port,
                    Yaml::String(n) => s(&cp["name"]) == *n,
                    _ => false,
                }
        });
        assert!(
            ok,
            "service.yaml: targetPort {target:?} is not the server's port"
        );
    }

    let hpa = &yaml("docker/k8s/hpa.yaml")[0];
    assert_eq!(s(&hpa["apiVersion"]), "autoscaling/v2");
    assert_eq!(s(&hpa["spec"]["scaleTargetRef"]["kind"]), "Deployment");
    assert_eq!(s(&hpa["spec"]["scaleTargetRef"]["name"]), name);
    assert!(int(&hpa["spec"]["minReplicas"]) >= 1);
    assert!(int(&hpa["spec"]["maxReplicas"]) >= int(&hpa["spec"]["minReplicas"]));
    let (reads, serves) = adapter_rules();
    let metrics: Vec<String> = items(&hpa["spec"]["metrics"])
        .iter()
        .map(|m| {
            assert_eq!(s(&m["type"]), "Pods");
            s(&m["pods"]["metric"]["name"])
        })
        .collect();
    assert!(!metrics.is_empty());
    for m in &metrics {
        assert!(
            serves.contains(m),
            "hpa.yaml: metric {m} is served by no rule of prometheus-adapter.yaml ({serves:?})"
        );
    }
    let declared = declared_metrics();
    assert!(declared.contains("diracnet_queue_depth"), "{declared:?}");
    for series in &reads {
        assert!(
            declared.contains(family(series)),
            "prometheus-adapter.yaml reads {series}, which src/server/metrics.rs does not declare"
        );
    }

    let isvc = &yaml("docker/k8s/kserve.yaml")[0];
    assert_eq!(s(&isvc["apiVersion"]), "serving.kserve.io/v1beta1");
    let predictor = &isvc["spec"]["predictor"];
    assert_eq!(
        s(&items(&predictor["containers"])[0]["name"]),
        "kserve-container"
    );
    assert!(int(&predictor["minReplicas"]) >= 1);
    check_prometheus_annotations(&isvc["metadata"]["annotations"], "kserve.yaml", &flags);

    let kustomization = &yaml("docker/k8s/kustomization.yaml")[0];
    for r in items(&kustomization["resources"]) {
        assert!(
            root().join("docker/k8s").join(s(r)).is_file(),
            "kustomization: {r:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Test: the probe paths and metrics against a real server

struct Server {
    child: Child,
    port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `(status, body)` of an HTTP/1.0 request (no chunked encoding to undo).
fn http(port: u16, method: &str, path: &str, body: &[u8], content_type: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let head = format!(
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).unwrap();
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad HTTP response: {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

fn get(port: u16, path: &str) -> (u16, String) {
    http(port, "GET", path, b"", "text/plain")
}

fn start_server(cache: &Path) -> Server {
    let model = root().join("tests/fixtures/models/dn18w16.safetensors");
    let mut child = diracnet()
        .args(["serve", "--host", "127.0.0.1", "--port", "0"])
        .args(["--device", "cpu", "--offline", "--max-batch-size", "2"])
        .arg("--model")
        .arg(&model)
        .env("DIRACNET_CACHE", cache)
        .env("DIRACNET_LOG", "info")
        .env("DIRACNET_LOG_FORMAT", "json")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The bound address is in the log line `listening` (port 0: the OS picks a free port).
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let addr = serde_json::from_str::<serde_json::Value>(&line)
                .ok()
                .and_then(|v| v["fields"]["addr"].as_str().map(String::from));
            match addr {
                Some(addr) => {
                    let _ = tx.send(addr);
                }
                None if line.contains("ERROR") || line.contains("WARN") => eprintln!("{line}"),
                None => {}
            }
        }
    });
    let mut server = Server { child, port: 0 };
    let addr = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("no `listening` log line with the address within 60 s");
    server.port = addr.rsplit(':').next().unwrap().parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while get(server.port, "/readyz").0 != 200 {
        assert!(Instant::now() < deadline, "server not ready within 120 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    server
}

#[test]
fn probe_paths_and_autoscaling_metrics_exist_on_a_real_server() {
    let flags = Flags::of_serve();
    let probe_paths = all_probe_paths(&flags);
    assert!(probe_paths.contains("/healthz") && probe_paths.contains("/readyz"));

    let cache = tempfile::tempdir().unwrap();
    let server = start_server(cache.path());
    for path in &probe_paths {
        assert_eq!(get(server.port, path).0, 200, "probe path {path}");
    }

    // One inference, so that the queue histogram has a series.
    let image = std::fs::read(root().join("tests/fixtures/images/chelsea.jpg")).unwrap();
    let (status, body) = http(server.port, "POST", "/classify", &image, "image/jpeg");
    assert_eq!(status, 200, "{body}");

    let (status, metrics) = get(server.port, "/metrics");
    assert_eq!(status, 200);
    let exported: BTreeSet<&str> = metrics
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap())
        .collect();
    let (reads, _) = adapter_rules();
    for series in &reads {
        assert!(
            exported.contains(series.as_str()),
            "/metrics has no {series} (read by prometheus-adapter.yaml)"
        );
    }
}
