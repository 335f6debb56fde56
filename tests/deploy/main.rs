//! The deployment files (`Dockerfile`, `docker/`, `docker/k8s/`) against the code, offline and
//! without a Docker engine or a cluster: they parse, and what they name exists. Env variables
//! are flags of `diracnet serve`, ports and the shutdown timeout are the binary's defaults, the
//! grace periods outlast the drain, every probe path answers 200 from a real `diracnet serve`,
//! and the metrics the autoscaler reads are exported.
//!
//! - `files.rs`: reading the repository's files, YAML and its scalars, URL paths, durations;
//! - `flags.rs`: what the binary says about itself (`diracnet serve --help`, metric families);
//! - `dockerfile.rs`: the two Dockerfiles, `.dockerignore` and `docker/build.sh`;
//! - `compose.rs`: `docker/compose.yaml`;
//! - `k8s.rs`: the Kubernetes manifests in `docker/k8s/`;
//! - `probes.rs`: every probe path and the autoscaling metrics on a real `diracnet serve`.

#[path = "../common/mod.rs"]
mod common;

mod compose;
mod dockerfile;
mod files;
mod flags;
mod k8s;
mod probes;
