#!/usr/bin/env bash
# A/B: the same `middleman bench` rows against two middleman binaries (e.g. before and
# after a change), alternating which goes first each round, RUNS rounds; medians and
# the new/old ratio per row. The load client is the NEW binary's `bench` for both.
#
#   bash benches/ab.sh OLD_BINARY NEW_BINARY          # RUNS=3, DUR=3s
#   ROWS="pipe64_1 pubs64_100x10" bash benches/ab.sh OLD NEW   # chosen rows only
#
# Rows (same shapes and names as benches/compare.sh): fanout64_1 fanout64_100
# fanout1024_1 fanout1024_100 pipe64_1 pipe64_100 pubs64_100x10 reqres100x16x2, and
# the history rows hist64_1 hist64_100 (fan-out to a topic under a `[[history]]` rule;
# when one is asked for, both servers run with benches/history.toml, so the plain
# rows of that run pay the prefix check as they do there). With hist and plain rows
# both given, the table also shows history / plain per binary:
#   ROWS="fanout64_1 hist64_1 fanout64_100 hist64_100" bash benches/ab.sh OLD NEW
#
# Only 127.0.0.1. Each round starts each server fresh.
set -euo pipefail
cd "$(dirname "$0")/.."
OLD=${1:?usage: ab.sh OLD_BINARY NEW_BINARY}
NEW=${2:?usage: ab.sh OLD_BINARY NEW_BINARY}
RUNS=${RUNS:-3}
DUR=${DUR:-3s}
ROWS=${ROWS:-fanout64_1 fanout64_100 fanout1024_100 pipe64_1 pipe64_100 pubs64_100x10 reqres100x16x2}
PORT=${PORT:-18775}
KEY=bench-service-key-0123456789
OUT=target/ab
mkdir -p "$OUT"
RESULTS="$OUT/results.txt"
: > "$RESULTS"
ulimit -n "$(ulimit -Hn)"
# With history rows, both servers run with benches/history.toml (a binary from
# before history would refuse it, so it is given only then).
CONFIG=()
case " $ROWS " in
*" hist"*)
    CONFIG=(--config benches/history.toml)
    ;;
esac

PID=""
stop() {
    if [ -n "$PID" ]; then
        kill "$PID" 2>/dev/null || true
        wait "$PID" 2>/dev/null || true
    fi
    PID=""
}
trap stop EXIT

# one WHICH BINARY ROW ARGS...
one() {
    local which=$1 bin=$2 row=$3
    shift 3
    "$bin" --listen "127.0.0.1:$PORT" --service-key "$KEY" --client-key "c-$KEY" \
        --max-connections 20000 --log-level warn "${CONFIG[@]}" > "$OUT/$which.log" 2>&1 &
    PID=$!
    for _ in $(seq 1 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
        sleep 0.1
    done
    local line
    line=$(timeout 300 "$NEW" bench "$@" --url "ws://127.0.0.1:$PORT/" --key "$KEY" \
        --server-pid "$PID" | grep '^result:' || echo "result: failed=1")
    echo "row=$row run=$RUN which=$which $line" | tee -a "$RESULTS"
    stop
}

both() {
    local row=$1
    shift
    if [ $((RUN % 2)) -eq 1 ]; then
        one old "$OLD" "$row" "$@"
        one new "$NEW" "$row" "$@"
    else
        one new "$NEW" "$row" "$@"
        one old "$OLD" "$row" "$@"
    fi
}

echo "load before: $(cat /proc/loadavg)" | tee "$OUT/machine.txt"
PIPE=(--write-kib 16 --inflight 100000)
for RUN in $(seq 1 "$RUNS"); do
    for row in $ROWS; do
        case $row in
        fanout64_1) both "$row" fanout --subs 1 --size 64 --duration "$DUR" ;;
        fanout64_100) both "$row" fanout --subs 100 --size 64 --duration "$DUR" --threads 2 ;;
        fanout1024_1) both "$row" fanout --subs 1 --size 1024 --duration "$DUR" ;;
        fanout1024_100) both "$row" fanout --subs 100 --size 1024 --duration "$DUR" --threads 2 ;;
        pipe64_1) both "$row" fanout --subs 1 --size 64 --duration "$DUR" "${PIPE[@]}" ;;
        pipe64_100) both "$row" fanout --subs 100 --size 64 --duration "$DUR" --threads 2 "${PIPE[@]}" ;;
        pubs64_100x10) both "$row" fanout --publishers 100 --subs 10 --size 64 --duration "$DUR" --threads 2 ;;
        hist64_1) both "$row" fanout --subs 1 --size 64 --duration "$DUR" --subject hist.b ;;
        hist64_100) both "$row" fanout --subs 100 --size 64 --duration "$DUR" --threads 2 --subject hist.b ;;
        reqres100x16x2) both "$row" reqres --requesters 100 --window 16 --responders 2 --duration "$DUR" ;;
        *)
            echo "unknown row $row" >&2
            exit 2
            ;;
        esac
    done
done
echo "load after: $(cat /proc/loadavg)" | tee -a "$OUT/machine.txt"

python3 - "$RESULTS" <<'PY' | tee "$OUT/table.md"
import sys, statistics
rows = {}
for line in open(sys.argv[1]):
    kv = dict(p.split("=", 1) for p in line.split() if "=" in p)
    rows.setdefault(kv["row"], {}).setdefault(kv["which"], []).append(kv)
print("| row | old (median, per server CPU-s) | new | new/old | spread old | spread new |")
print("|---|---|---|---|---|---|")
for row, d in rows.items():
    key = "requests_per_server_cpu_s" if row.startswith("reqres") else "deliveries_per_server_cpu_s"
    o = [float(r[key]) for r in d.get("old", []) if key in r]
    n = [float(r[key]) for r in d.get("new", []) if key in r]
    if not o or not n:
        print(f"| {row} | n/a | n/a | n/a | | |")
        continue
    mo, mn = statistics.median(o), statistics.median(n)
    print(f"| {row} | {mo/1e6:.2f}M | {mn/1e6:.2f}M | {mn/mo:.3f} | {min(o)/1e6:.2f}-{max(o)/1e6:.2f}M | {min(n)/1e6:.2f}-{max(n)/1e6:.2f}M |")
meds = {row: {w: statistics.median(float(r[k]) for r in rs if k in r)
              for w, rs in d.items() for k in ["deliveries_per_server_cpu_s"]
              if any(k in r for r in rs)}
        for row, d in rows.items()}
pairs = [(h, p) for h, p in (("hist64_1", "fanout64_1"), ("hist64_100", "fanout64_100"))
         if h in meds and p in meds]
# The same ratio round by round (each round runs a binary's plain and history rows a few
# seconds apart, so a change in the machine's load between rounds cancels out): median
# and range.
def per_round(h, p, w):
    val = lambda row: {r["run"]: float(r["deliveries_per_server_cpu_s"])
                       for r in rows[row].get(w, []) if "deliveries_per_server_cpu_s" in r}
    hv, pv = val(h), val(p)
    return [hv[run] / pv[run] for run in hv if run in pv]
if pairs:
    print()
    print("| history / plain | old: of medians | old: per round, median (range) | new: of medians | new: per round, median (range) |")
    print("|---|---|---|---|---|")
    for h, p in pairs:
        cells = []
        for w in ("old", "new"):
            cells.append(f"{meds[h][w] / meds[p][w]:.2f}x" if w in meds[h] and w in meds[p] else "n/a")
            rs = per_round(h, p, w)
            cells.append(f"{statistics.median(rs):.2f}x ({min(rs):.2f}-{max(rs):.2f})" if rs else "n/a")
        print(f"| {h} / {p} | " + " | ".join(cells) + " |")
bad = [(row, w, r.get("lost"), r.get("out_of_order"), r.get("failed"))
       for row, d in rows.items() for w, rs in d.items() for r in rs
       if r.get("lost", "0") != "0" or r.get("out_of_order", "0") != "0" or "failed" in r]
print()
print(f"runs with loss, reordering or failure: {len(bad)} {bad if bad else ''}")
PY
