#!/usr/bin/env bash
# Validates the deployment files (make validate-deploy; make test runs it).
# There is no Docker engine or Kubernetes cluster here, so each file is
# checked against its schema or with its own tool:
#
#   docker-compose.yml   check-jsonschema, the Compose Specification's schema
#   deploy/k8s           kubernetes-validate --strict (Kubernetes $K8S_VERSIONS);
#                        KEDA resources against KEDA's CRD schemas (deploy/validate/keda.py)
#   deploy/Dockerfile    hadolint (deploy/.hadolint.yaml), dockerfile-utils lint (npm)
#   deploy/prometheus    promtool check rules, promtool test rules (*_test.yml),
#                        promtool check config (the compose Prometheus config)
#   everything           deploy/validate/check_deploy.py: the files agree with
#                        each other and with the worker's config (ports, paths,
#                        drain deadline, partitions, every alert unit-tested,
#                        every dashboard query parses)
#
# The validators install into git-ignored folders: .cache/venv-deploy (PyPI,
# deploy/validate/requirements.txt), .cache/npm-deploy (npm), and Debian's
# prometheus package when promtool is missing (it also brings the server
# tests/prometheus.rs runs). Idempotent; a second run only validates (a few
# seconds). Runs every check, then exits 1 if any failed.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
venv="$root/.cache/venv-deploy"
req="$root/deploy/validate/requirements.txt"
npm_dir="$root/.cache/npm-deploy"
DOCKERFILE_UTILS_VERSION="${DOCKERFILE_UTILS_VERSION:-0.16.3}"
K8S_VERSIONS="${K8S_VERSIONS:-1.29 1.37}"

say() { echo "validate-deploy: $*"; }

# ---- set-up ----------------------------------------------------------------
stamp="$venv/.requirements.sha256"
# a venv is not relocatable: its scripts name its path, so the stamp does too
want="$(sha256sum "$req" | cut -d' ' -f1) $venv"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! "$venv/bin/python" -c '' 2>/dev/null; then
  say "installing the validators into $venv"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --upgrade pip
  "$venv/bin/pip" install --quiet -r "$req"
  echo "$want" > "$stamp"
fi

if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
  say "installing Debian's prometheus package (promtool, and the server tests/prometheus.rs runs)"
  # the package's maintainer script would start the service: not here
  made_policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    made_policy=1
  fi
  status=0
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -qq --no-install-recommends prometheus >/dev/null; } || status=$?
  [ -z "$made_policy" ] || rm -f /usr/sbin/policy-rc.d
  [ "$status" = 0 ] || { say "apt-get install prometheus failed ($status)"; exit 1; }
fi

dockerfile_utils=""
if command -v npm >/dev/null; then
  if [ "$(cat "$npm_dir/.version" 2>/dev/null)" != "$DOCKERFILE_UTILS_VERSION" ]; then
    say "installing dockerfile-utils $DOCKERFILE_UTILS_VERSION into $npm_dir"
    rm -rf "$npm_dir"
    mkdir -p "$npm_dir"
    if npm install --silent --no-audit --no-fund --prefix "$npm_dir" "dockerfile-utils@$DOCKERFILE_UTILS_VERSION" >/dev/null 2>&1; then
      echo "$DOCKERFILE_UTILS_VERSION" > "$npm_dir/.version"
    else
      say "npm install dockerfile-utils failed: that Dockerfile check is skipped"
    fi
  fi
  [ -x "$npm_dir/node_modules/.bin/dockerfile-utils" ] && dockerfile_utils="$npm_dir/node_modules/.bin/dockerfile-utils"
fi

# ---- checks ----------------------------------------------------------------
failed=()
check() {
  local name="$1"
  shift
  echo "== $name"
  if "$@"; then
    echo "   passed: $name"
  else
    echo "   FAILED: $name"
    failed+=("$name")
  fi
}

check "docker-compose.yml: Compose Specification schema" \
  "$venv/bin/check-jsonschema" --builtin-schema vendor.compose-spec docker-compose.yml

mapfile -t k8s_files < <(ls deploy/k8s/*.yaml | grep -v -e '/kustomization.yaml$' -e '/keda.yaml$')
for v in $K8S_VERSIONS; do
  check "deploy/k8s: Kubernetes $v schemas (strict)" \
    "$venv/bin/kubernetes-validate" --strict --quiet -k "$v" "${k8s_files[@]}"
done
check "deploy/k8s/keda.yaml: KEDA CRD schemas (strict)" \
  "$venv/bin/python" deploy/validate/keda.py deploy/k8s/keda.yaml

check "deploy/Dockerfile: hadolint" \
  "$venv/bin/hadolint" --no-color --config deploy/.hadolint.yaml deploy/Dockerfile
if [ -n "$dockerfile_utils" ]; then
  check "deploy/Dockerfile: dockerfile-utils lint" "$dockerfile_utils" lint deploy/Dockerfile
else
  echo "== deploy/Dockerfile: dockerfile-utils lint: skipped (npm not available)"
fi

mapfile -t rule_files < <(ls deploy/prometheus/*.yml | grep -v '_test\.yml$')
mapfile -t rule_tests < <(ls deploy/prometheus/*_test.yml)
check "deploy/prometheus: promtool check rules" promtool check rules "${rule_files[@]}"
check "deploy/prometheus: promtool test rules (each alert fires)" promtool test rules "${rule_tests[@]}"
compose_prometheus() {
  # as mounted in docker-compose.yml: the config, its rules under rules/
  local t
  t=$(mktemp -d)
  cp deploy/compose/prometheus.yml "$t/prometheus.yml"
  ln -s "$root/deploy/prometheus" "$t/rules"
  local status=0
  promtool check config "$t/prometheus.yml" || status=$?
  rm -rf "$t"
  return "$status"
}
check "deploy/compose/prometheus.yml: promtool check config" compose_prometheus

check "consistency of the deployment files" \
  env PROMTOOL="$(command -v promtool)" "$venv/bin/python" deploy/validate/check_deploy.py "$root"

if [ "${#failed[@]}" -gt 0 ]; then
  say "${#failed[@]} failed: ${failed[*]}"
  exit 1
fi
say "every check passed"
