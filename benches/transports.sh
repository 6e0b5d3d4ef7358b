#!/usr/bin/env bash
# middleman over ws:// vs tcp:// (the raw stream protocol): same server process
# listening on both, same client (`middleman bench`), alternating, RUNS rounds;
# medians per server CPU-second in a table. Also the idle-connection RSS row
# (conns10k) on each transport, each on a freshly started server.
#
#   bash benches/transports.sh            # RUNS=3, DUR=3s; results in target/transports/
#
# Only 127.0.0.1. Starts and stops only its own server, by PID.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${RUNS:-3}
DUR=${DUR:-3s}
WS_PORT=${WS_PORT:-18775}
TCP_PORT=${TCP_PORT:-18776}
KEY=bench-service-key-0123456789
OUT=target/transports
mkdir -p "$OUT"
RESULTS="$OUT/results.txt"
: > "$RESULTS"

cargo build --release --quiet
BIN=target/release/middleman
ulimit -n "$(ulimit -Hn)"

MM_PID=""
stop_server() {
    if [ -n "$MM_PID" ]; then
        kill "$MM_PID" 2>/dev/null || true
        wait "$MM_PID" 2>/dev/null || true
    fi
    MM_PID=""
}
trap stop_server EXIT

start_server() {
    "$BIN" --listen "ws://127.0.0.1:$WS_PORT" --listen "tcp://127.0.0.1:$TCP_PORT" \
        --service-key "$KEY" --client-key "c-$KEY" \
        --max-connections 20000 --log-level warn > "$OUT/mm.log" 2>&1 &
    MM_PID=$!
    for _ in $(seq 1 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$WS_PORT") 2>/dev/null &&
            (exec 3<>"/dev/tcp/127.0.0.1/$TCP_PORT") 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    echo "server did not start" >&2
    exit 1
}

# one ROW_NAME TRANSPORT ARGS...
one() {
    local row=$1 tr=$2
    shift 2
    local url
    if [ "$tr" = ws ]; then url="ws://127.0.0.1:$WS_PORT/"; else url="tcp://127.0.0.1:$TCP_PORT"; fi
    local line
    line=$(timeout 300 "$BIN" bench "$@" --url "$url" --key "$KEY" \
        --server-pid "$MM_PID" | grep '^result:' || echo "result: transport=$tr failed=1")
    echo "row=$row run=$RUN $line" | tee -a "$RESULTS"
}

# both ROW_NAME ARGS...: ws first in odd rounds, tcp first in even ones.
both() {
    local row=$1
    shift
    if [ $((RUN % 2)) -eq 1 ]; then
        one "$row" ws "$@"
        one "$row" tcp "$@"
    else
        one "$row" tcp "$@"
        one "$row" ws "$@"
    fi
}

# conns on a fresh server per transport, so each starts from a clean process.
conns_row() {
    local order="ws tcp"
    if [ $((RUN % 2)) -eq 0 ]; then order="tcp ws"; fi
    for tr in $order; do
        start_server
        one conns10k "$tr" conns --conns 10000 --hold 2s
        stop_server
    done
}

echo "load before: $(cat /proc/loadavg)" | tee "$OUT/machine.txt"
for RUN in $(seq 1 "$RUNS"); do
    conns_row
    start_server
    for size in 64 1024; do
        both "fanout${size}_1" fanout --subs 1 --size "$size" --duration "$DUR"
        both "fanout${size}_100" fanout --subs 100 --size "$size" --duration "$DUR" --threads 2
    done
    both reqres100x16x2 reqres --requesters 100 --window 16 --responders 2 --duration "$DUR"
    stop_server
done
echo "load after: $(cat /proc/loadavg)" | tee -a "$OUT/machine.txt"

python3 - "$RESULTS" <<'EOF' | tee "$OUT/table.md"
import sys, statistics
rows = {}
for line in open(sys.argv[1]):
    kv = dict(p.split("=", 1) for p in line.split() if "=" in p)
    tr = kv.get("transport")
    if tr is None:
        continue
    rows.setdefault(kv["row"], {}).setdefault(tr, []).append(kv)

def med(runs, key):
    vals = [float(r[key]) for r in runs if key in r]
    return statistics.median(vals) if vals else float("nan")

def fmt(v, unit):
    if v != v:
        return "n/a"
    if unit == "M":
        return f"{v/1e6:.2f}M"
    if unit == "us":
        return f"{v:.0f} µs" if v < 1000 else f"{v/1000:.2f} ms"
    if unit == "B":
        return f"{v/1000:.1f} kB"
    return f"{v:.0f}"

spec = [
    ("fanout64_1", "fan-out 64 B, 1 subscriber (deliveries / server CPU-s)", "deliveries_per_server_cpu_s", "M", True),
    ("fanout64_100", "fan-out 64 B, 100 subscribers", "deliveries_per_server_cpu_s", "M", True),
    ("fanout1024_1", "fan-out 1 KiB, 1 subscriber", "deliveries_per_server_cpu_s", "M", True),
    ("fanout1024_100", "fan-out 1 KiB, 100 subscribers", "deliveries_per_server_cpu_s", "M", True),
    ("reqres100x16x2", "requests 100 x window 16, 2 responders (per server CPU-s)", "requests_per_server_cpu_s", "M", True),
    ("conns10k", "RSS per idle authenticated connection at 10,000", "rss_per_conn", "B", False),
]
print("| scenario | ws:// | tcp:// | tcp vs ws |")
print("|---|---|---|---|")
for row, label, key, unit, higher in spec:
    r = rows.get(row, {})
    w, t = med(r.get("ws", []), key), med(r.get("tcp", []), key)
    ratio = t / w if w and w == w and t == t else float("nan")
    if not higher and t and t == t:
        ratio = w / t
    print(f"| {label} | {fmt(w, unit)} | {fmt(t, unit)} | {ratio:.2f}x |")
print()
print("| row | ws:// (rounds in order) | tcp:// (rounds in order) |")
print("|---|---|---|")
for row, label, key, unit, higher in spec:
    r = rows.get(row, {})
    cells = [" ".join(fmt(float(x[key]), unit) if key in x else "fail" for x in r.get(tr, [])) for tr in ("ws", "tcp")]
    print(f"| {row} | {cells[0]} | {cells[1]} |")
print()
for row in ("fanout64_1", "fanout1024_100", "reqres100x16x2"):
    r = rows.get(row, {})
    print(row, "p50/p99 µs:", {tr: [(x.get("p50_us"), x.get("p99_us")) for x in r.get(tr, [])] for tr in ("ws", "tcp")})
bad = [(row, t, r.get("lost"), r.get("out_of_order"), r.get("failed"))
       for row, d in rows.items() for t, rs in d.items() for r in rs
       if r.get("lost", "0") != "0" or r.get("out_of_order", "0") != "0" or r.get("errors", "0") != "0" or "failed" in r]
n = sum(len(rs) for d in rows.values() for rs in d.values())
print()
print(f"runs: {n}; with loss, reordering, errors or failure: {len(bad)} {bad if bad else ''}")
EOF
