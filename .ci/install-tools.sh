#!/usr/bin/env bash
# Installs every outside tool the test suite needs, so that
#   cargo test -- --include-ignored
# runs everything (the tests that need these tools are #[ignore]d in a plain `cargo test`,
# each with the reason). Idempotent: what is already there is kept. Debian, as root.
#
#   Debian packages  chromium (browser tests), nodejs + npm, python3 + python3-venv
#                    (Python client), systemd (systemd-analyze), nats-server,
#                    curl (tests/http_api.rs)
#   npm              playwright-core in tests/browser-client and tests/browser-console,
#                    exactly as their package-lock.json files pin it (npm ci)
#   crates.io        cargo-fuzz, pinned below
#   Python 2.7       for ../shared/tools/autobahn.sh (pyenv 2.7.18 or python2), and the
#                    autobahntestsuite package that script uses, installed where it looks
#
# Fails (non-zero, with what is missing) when any tool cannot be installed.
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_FUZZ_VERSION=0.13.2
AUTOBAHN_VERSION=25.10.1 # the version ../shared/tools/autobahn.sh installs

say() { echo "install-tools: $*"; }
die() {
  echo "install-tools: FAILED: $*" >&2
  exit 1
}

# ---------------------------------------------------------------- Debian packages
need=()
[ -x /usr/bin/chromium ] || need+=(chromium)
command -v node >/dev/null 2>&1 || need+=(nodejs)
command -v npm >/dev/null 2>&1 || need+=(npm)
command -v python3 >/dev/null 2>&1 || need+=(python3)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3-venv)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
command -v nats-server >/dev/null 2>&1 || need+=(nats-server)
command -v curl >/dev/null 2>&1 || need+=(curl)
if [ "${#need[@]}" -gt 0 ]; then
  say "apt-get install ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update || die "apt-get update"
  apt-get install -y "${need[@]}" || die "apt-get install ${need[*]}"
else
  say "Debian packages present"
fi
[ -x /usr/bin/chromium ] || die "/usr/bin/chromium missing after install"
for t in node npm python3 systemd-analyze nats-server curl; do
  command -v "$t" >/dev/null 2>&1 || die "$t missing after install"
done
python3 -c 'import venv, ensurepip' || die "python3 cannot create a venv with pip"
say "chromium: $(/usr/bin/chromium --version 2>/dev/null || echo '?')"
say "node $(node --version), npm $(npm --version), $(python3 --version)"
say "nats-server $(nats-server --version 2>&1 | head -1), $(systemd-analyze --version | head -1)"

# ---------------------------------------------------------------- npm (lock files)
for dir in tests/browser-client tests/browser-console; do
  want=$(node -p "require('./$dir/package-lock.json').packages['node_modules/playwright-core'].version")
  have=$(node -p "try { require('./$dir/node_modules/playwright-core/package.json').version } catch (e) { '' }")
  if [ "$want" = "$have" ]; then
    say "$dir: playwright-core $have present"
  else
    say "$dir: npm ci (playwright-core $want)"
    (cd "$dir" && npm ci --no-audit --no-fund) || die "npm ci in $dir"
  fi
done

# ---------------------------------------------------------------- cargo-fuzz (pinned)
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
have=$(cargo fuzz --version 2>/dev/null | awk '{print $2}' || true)
if [ "$have" = "$CARGO_FUZZ_VERSION" ]; then
  say "cargo-fuzz $have present"
else
  say "cargo install cargo-fuzz $CARGO_FUZZ_VERSION (had: ${have:-none})"
  cargo install --locked --force --version "$CARGO_FUZZ_VERSION" cargo-fuzz \
    || die "cargo install cargo-fuzz $CARGO_FUZZ_VERSION"
fi

# ---------------------------------------------------------------- Python 2.7 for Autobahn
# The same lookup as ../shared/tools/autobahn.sh: pyenv's 2.7.18, else python2. Debian 12
# has no Python 2 package; pyenv can build one where it is installed.
find_py2() { PYENV_VERSION=2.7.18 pyenv which python 2>/dev/null || command -v python2 || true; }
py2=$(find_py2)
if [ -z "$py2" ] && command -v pyenv >/dev/null 2>&1; then
  say "pyenv install 2.7.18"
  pyenv install -s 2.7.18 || die "pyenv install 2.7.18 (Autobahn needs Python 2.7)"
  py2=$(find_py2)
fi
[ -n "$py2" ] || die "no Python 2.7 (pyenv 2.7.18 or python2) for Autobahn, and no pyenv to build one"
say "python 2.7: $py2"
home=${AUTOBAHN_HOME:-$HOME/.cache/autobahn}
if [ -f "$home/site/autobahntestsuite/__init__.py" ]; then
  say "autobahntestsuite present in $home/site"
else
  say "pip install autobahntestsuite==$AUTOBAHN_VERSION into $home/site"
  mkdir -p "$home"
  "$py2" -m pip install -q --target "$home/site" "autobahntestsuite==$AUTOBAHN_VERSION" \
    || die "pip install autobahntestsuite==$AUTOBAHN_VERSION (Python 2.7)"
fi
[ -f ../shared/tools/autobahn.sh ] || die "../shared/tools/autobahn.sh is not beside the checkout"

say "all tools present"
