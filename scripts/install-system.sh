#!/usr/bin/env bash
# Debian packages the tests and benchmarks use: real servers and tools, never fakes of them.
#   redis-server  the shared quarantine's store (tests start their own on a free port)
#   wrk           the relay benchmark's load generator
#   nginx-light   the benchmark's floor for a relay
#   prometheus    for promtool: the deploy tests check the alerting rules with Prometheus's own parser
# Installs only what is missing; needs root (or sudo) the first time, as in CI.
set -euo pipefail
want=(redis-server:redis-server wrk:wrk nginx:nginx-light promtool:prometheus)
missing=()
for pair in "${want[@]}"; do
  cmd=${pair%%:*} pkg=${pair#*:}
  command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "installing Debian packages: ${missing[*]}" >&2
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# Debian starts the services it installs; the tests start their own on free ports.
for svc in redis-server nginx prometheus; do
  if command -v systemctl >/dev/null 2>&1; then $sudo systemctl disable --now "$svc" >/dev/null 2>&1 || true; fi
done
