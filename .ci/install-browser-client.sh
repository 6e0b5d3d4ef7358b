#!/usr/bin/env bash
# Installs what tests/client_browser.rs needs: Debian's chromium, node + npm, and
# playwright-core (pinned by tests/browser-client/package-lock.json). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
[ -x /usr/bin/chromium ] || need+=(chromium)
command -v node >/dev/null 2>&1 || need+=(nodejs)
command -v npm >/dev/null 2>&1 || need+=(npm)
if [ "${#need[@]}" -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update
  apt-get install -y "${need[@]}"
fi
(cd tests/browser-client && npm ci --no-audit --no-fund)
