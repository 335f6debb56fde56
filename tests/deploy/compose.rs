//! `docker/compose.yaml`: builds, ports, the cache volume, env, grace periods, healthchecks and
//! GPU reservations.

use std::{collections::BTreeMap, path::Path};

use crate::{
    common::root,
    files::{entries, items, s, seconds, yaml},
    flags::Flags,
};

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
