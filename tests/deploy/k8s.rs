//! `docker/k8s/`: the Deployment's and InferenceService's pods (ports, probes, grace periods,
//! env), the Service, the HPA and the Prometheus adapter rules it relies on, the kustomization.

use std::collections::{BTreeMap, BTreeSet};

use yaml_rust2::Yaml;

use crate::{
    common::root,
    dockerfile::check_dockerfile,
    files::{entries, int, items, present, s, url_paths, yaml},
    flags::{declared_metrics, Flags},
};

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
pub fn adapter_rules() -> (BTreeSet<String>, BTreeSet<String>) {
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

pub fn all_probe_paths(flags: &Flags) -> BTreeSet<String> {
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
