#!/usr/bin/env bash
# Puts Prometheus' promtool and server binary into a virtual environment: tests/deploy runs promtool check
# rules / check config, tests/e2e/test_metrics.py runs a real Prometheus that scrapes the real server.
# Takes the binaries out of Debian's `prometheus` package rather than installing the package: no service, no
# service user, no web assets, no postinst. Idempotent; a machine without the package only loses those
# checks (they skip and say why), so this never fails the build.
# Usage: install-promtool.sh VENV_DIR   -> VENV_DIR/bin/promtool, VENV_DIR/bin/prometheus
set -euo pipefail
venv=$(cd "${1:?usage: install-promtool.sh VENV_DIR}" && pwd)
if "$venv/bin/promtool" --version >/dev/null 2>&1 && "$venv/bin/prometheus" --version >/dev/null 2>&1; then exit 0; fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# apt-get download drops root privileges to _apt: let it write here.
if [[ $(id -u) == 0 ]] && id _apt >/dev/null 2>&1; then chown _apt "$tmp"; fi
fetch() { (cd "$tmp" && apt-get download -q prometheus >/dev/null 2>&1); }
if ! fetch; then
  if [[ $(id -u) == 0 ]]; then apt-get update -qq >/dev/null 2>&1 || true; fi
  if ! fetch; then
    echo "install-promtool: Debian package 'prometheus' unavailable; promtool checks will be skipped" >&2
    exit 0
  fi
fi
for tool in promtool prometheus; do
  dpkg-deb --fsys-tarfile "$tmp"/prometheus_*.deb | tar -x -O "./usr/bin/$tool" > "$tmp/$tool"
  install -m 0755 "$tmp/$tool" "$venv/bin/$tool"
  "$venv/bin/$tool" --version >/dev/null
done
