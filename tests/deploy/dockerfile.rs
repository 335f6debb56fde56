//! `Dockerfile` and `docker/cpu.Dockerfile`: instructions, stages, what COPY brings in (against
//! `.dockerignore`), the shared build script, and the runtime stage's env, port, user and
//! healthcheck.

use std::collections::{BTreeMap, BTreeSet};

use crate::{
    common::root,
    files::{read, seconds, url_paths},
    flags::Flags,
};

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

pub struct ImageFacts {
    pub env: BTreeMap<String, String>,
    pub healthcheck_paths: Vec<String>,
}

/// Checks one Dockerfile; `flavour` is the docker/build.sh argument its build must use.
pub fn check_dockerfile(rel: &str, flavour: &str, flags: &Flags) -> ImageFacts {
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
