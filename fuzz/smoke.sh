#!/usr/bin/env bash
# Fuzz smoke test: build every target in fuzz/fuzz_targets and run each for N seconds
# (default 20). Fails on any crash, assertion failure, leak or timeout that libFuzzer
# reports, or when a target does not build.
#
#   fuzz/smoke.sh [SECONDS]
#
# Works from a fresh clone: installs cargo-fuzz when it is missing. cargo-fuzz needs
# nightly-only flags; RUSTC_BOOTSTRAP=1 lets the stable toolchain accept them. When the
# address sanitizer cannot be built here, the targets run without a sanitizer (-s none).
# New corpus entries go to a temporary directory, so fuzz/corpus keeps only its seeds.
set -euo pipefail

secs="${1:-20}"
case "$secs" in
    ''|*[!0-9]*) echo "usage: $0 [SECONDS]" >&2; exit 2 ;;
esac

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here/.."   # cargo fuzz runs from the crate root

export RUSTC_BOOTSTRAP=1
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "smoke: installing cargo-fuzz"
    cargo install --locked --version 0.13.2 cargo-fuzz   # as .ci/install-tools.sh pins it
fi

targets=()
for f in "$here"/fuzz_targets/*.rs; do
    [ -e "$f" ] || continue
    targets+=("$(basename "$f" .rs)")
done
if [ "${#targets[@]}" -eq 0 ]; then
    echo "smoke: no fuzz targets in $here/fuzz_targets" >&2
    exit 1
fi

# -a: debug assertions and overflow checks on, so arithmetic slips crash too.
flags=(-a)
if ! cargo fuzz build "${flags[@]}" >/dev/null 2>&1; then
    echo "smoke: the address-sanitizer build failed here; using -s none"
    flags+=(-s none)
fi
cargo fuzz build "${flags[@]}"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

failed=()
for t in "${targets[@]}"; do
    echo "smoke: fuzzing $t for ${secs}s"
    mkdir -p "$work/$t" "fuzz/corpus/$t"
    log="$work/$t.log"
    if cargo fuzz run "${flags[@]}" "$t" "$work/$t" "fuzz/corpus/$t" -- \
        -max_total_time="$secs" -print_final_stats=1 >"$log" 2>&1; then
        grep -E '^(#[0-9]+[[:space:]]+DONE|Done [0-9]+ runs|stat::number_of_executed_units)' \
            "$log" | sed "s/^/smoke: $t: /" || true
    else
        tail -n 60 "$log"
        echo "smoke: $t FAILED (crash input under fuzz/artifacts/$t/)" >&2
        failed+=("$t")
    fi
done

if [ "${#failed[@]}" -gt 0 ]; then
    echo "smoke: ${#failed[@]} of ${#targets[@]} fuzz targets failed: ${failed[*]}" >&2
    exit 1
fi
echo "smoke: all ${#targets[@]} fuzz targets ran ${secs}s without a crash"
