#!/usr/bin/env bash
# Installs what tests/console_browser.rs needs: Debian's Chromium (/usr/bin/chromium) and
# playwright-core from tests/browser-console/package-lock.json. Idempotent: skips what is
# already there. Run as root (CI and the developer machines are).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -x /usr/bin/chromium ]; then
  echo "install-browser: chromium present ($(/usr/bin/chromium --version 2>/dev/null || echo unknown version))"
else
  echo "install-browser: installing chromium"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update
  apt-get install -y chromium
fi

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  echo "install-browser: installing node and npm"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update
  apt-get install -y nodejs npm
fi

dir=tests/browser-console
want=$(node -p "require('./$dir/package-lock.json').packages['node_modules/playwright-core'].version")
have=$(node -p "try { require('./$dir/node_modules/playwright-core/package.json').version } catch (e) { '' }")
if [ "$want" = "$have" ]; then
  echo "install-browser: playwright-core $have present"
else
  echo "install-browser: npm ci in $dir (playwright-core $want)"
  (cd "$dir" && npm ci --no-audit --no-fund)
fi
