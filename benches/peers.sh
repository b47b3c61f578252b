#!/usr/bin/env bash
# Installs the peers the side-by-side benchmark compares the gateway with: nginx (the
# distribution's package, for static files and proxy_cache) and wrk (load generator).
# Debian/Ubuntu, as root. `cargo bench --bench gateway` runs this when either is missing.
set -euo pipefail

missing=()
command -v nginx >/dev/null || missing+=(nginx)
command -v wrk >/dev/null || missing+=(wrk)
command -v git >/dev/null || missing+=(git)
command -v curl >/dev/null || missing+=(curl)
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "benches/peers.sh: please install: ${missing[*]} (needs root and apt-get here)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update
# The benchmark starts its own nginx on 127.0.0.1; the package's service is not needed.
apt-get install -y --no-install-recommends "${missing[@]}" ca-certificates
if command -v systemctl >/dev/null && systemctl is-active --quiet nginx 2>/dev/null; then
  systemctl stop nginx || true
fi
