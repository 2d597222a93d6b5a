#!/usr/bin/env bash
# Installs the Debian packages the test suite drives for real. Idempotent and quiet when all present.
set -euo pipefail
# Helm is not among them: scripts/fetch-helm.py (make helm) fetches a pinned binary from PyPI.
packages=(qemu-system-x86 seabios binutils openssl prometheus chromium)
# postgresql: tests/pg.py runs a private cluster (initdb + pg_ctl in a temporary directory) for the shared store.
packages+=(postgresql)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "install-system-deps: not root; missing ${missing[*]} (tests needing them will skip)" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
# The prometheus and postgresql packages would start their services on install; nothing here may start services.
# An existing policy-rc.d (Debian container images ship one) is put back afterwards, not deleted.
saved=""
if [ -e /usr/sbin/policy-rc.d ]; then saved=$(mktemp) && cp -p /usr/sbin/policy-rc.d "$saved"; fi
printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
trap 'if [ -n "$saved" ]; then mv "$saved" /usr/sbin/policy-rc.d; else rm -f /usr/sbin/policy-rc.d; fi' EXIT
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
