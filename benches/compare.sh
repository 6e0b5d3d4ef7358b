#!/usr/bin/env bash
# Side-by-side load runs: middleman vs nats-server (WebSocket listener), same client
# (`middleman bench`), same machine, alternating, RUNS rounds; medians in a table.
#
#   bash benches/compare.sh            # RUNS=3 by default; results in target/compare/
#   RUNS=5 DUR=5s bash benches/compare.sh
#
# Needs nats-server on PATH (Debian: apt-get install -y nats-server). Only 127.0.0.1.
# Each round starts both servers fresh (so the RSS row starts from a clean process),
# runs every row against middleman and nats-server in alternating order, and stops them.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${RUNS:-3}
DUR=${DUR:-3s}
MM_PORT=${MM_PORT:-18765}
NATS_WS_PORT=${NATS_WS_PORT:-18080}
NATS_PORT=${NATS_PORT:-14222}
KEY=bench-service-key-0123456789
OUT=target/compare
mkdir -p "$OUT"
RESULTS="$OUT/results.txt"
: > "$RESULTS"

cargo build --release --quiet
BIN=target/release/middleman
ulimit -n "$(ulimit -Hn)"

cat > "$OUT/nats.conf" <<EOF
listen: "127.0.0.1:$NATS_PORT"
max_connections: 64000
max_payload: 1048576
websocket {
  listen: "127.0.0.1:$NATS_WS_PORT"
  no_tls: true
}
EOF

MM_PID=""
NATS_PID=""
stop_servers() {
    for p in $MM_PID $NATS_PID; do
        kill "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
    MM_PID=""
    NATS_PID=""
}
trap stop_servers EXIT

start_servers() {
    "$BIN" --listen "127.0.0.1:$MM_PORT" --service-key "$KEY" --client-key "c-$KEY" \
        --max-connections 20000 --log-level warn > "$OUT/mm.log" 2>&1 &
    MM_PID=$!
    nats-server -c "$OUT/nats.conf" > "$OUT/nats.log" 2>&1 &
    NATS_PID=$!
    for _ in $(seq 1 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$MM_PORT") 2>/dev/null &&
            (exec 3<>"/dev/tcp/127.0.0.1/$NATS_WS_PORT") 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    echo "servers did not start" >&2
    exit 1
}

# one ROW_NAME PROTO ARGS...: run `middleman bench ARGS` against PROTO's server.
one() {
    local row=$1 proto=$2
    shift 2
    local url pid
    if [ "$proto" = mm ]; then
        url="ws://127.0.0.1:$MM_PORT/"
        pid=$MM_PID
    else
        url="ws://127.0.0.1:$NATS_WS_PORT/"
        pid=$NATS_PID
    fi
    local line
    line=$(timeout 300 "$BIN" bench "$@" --proto "$proto" --url "$url" --key "$KEY" \
        --server-pid "$pid" | grep '^result:' || echo "result: failed=1")
    echo "row=$row run=$RUN $line" | tee -a "$RESULTS"
}

# both ROW_NAME ARGS...: the row against both servers, order alternating by round.
both() {
    local row=$1
    shift
    if [ $((RUN % 2)) -eq 1 ]; then
        one "$row" mm "$@"
        one "$row" nats "$@"
    else
        one "$row" nats "$@"
        one "$row" mm "$@"
    fi
}

echo "load before: $(cat /proc/loadavg)" | tee "$OUT/machine.txt"
for RUN in $(seq 1 "$RUNS"); do
    start_servers
    both conns10k conns --conns 10000 --hold 2s
    for size in 64 1024; do
        both "fanout${size}_1" fanout --subs 1 --size "$size" --duration "$DUR"
        both "fanout${size}_100" fanout --subs 100 --size "$size" --duration "$DUR" --threads 2
        both "fanout${size}_1000" fanout --subs 1000 --size "$size" --duration "$DUR" --threads 2
    done
    both fanout64_1_pack fanout --subs 1 --size 64 --duration "$DUR" --pack
    both lat1_10k fanout --subs 1 --rate 10000 --duration "$DUR"
    both lat1000_100 fanout --subs 1000 --rate 100 --duration "$DUR" --threads 2
    both reqres100x16x2 reqres --requesters 100 --window 16 --responders 2 --duration "$DUR"
    stop_servers
done
echo "load after: $(cat /proc/loadavg)" | tee -a "$OUT/machine.txt"

python3 - "$RESULTS" <<'EOF' | tee "$OUT/table.md"
import sys, statistics
rows = {}
for line in open(sys.argv[1]):
    kv = dict(p.split("=", 1) for p in line.split() if "=" in p)
    proto = kv.get("proto")
    if proto is None:
        continue
    rows.setdefault(kv["row"], {}).setdefault(proto, []).append(kv)

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
    ("fanout64_1_pack", "(extra) fan-out 64 B, 1 subscriber, publisher packs 16 per WebSocket message", "deliveries_per_server_cpu_s", "M", True),
    ("fanout64_100", "fan-out 64 B, 100 subscribers", "deliveries_per_server_cpu_s", "M", True),
    ("fanout64_1000", "fan-out 64 B, 1000 subscribers", "deliveries_per_server_cpu_s", "M", True),
    ("fanout1024_1", "fan-out 1 KiB, 1 subscriber", "deliveries_per_server_cpu_s", "M", True),
    ("fanout1024_100", "fan-out 1 KiB, 100 subscribers", "deliveries_per_server_cpu_s", "M", True),
    ("fanout1024_1000", "fan-out 1 KiB, 1000 subscribers", "deliveries_per_server_cpu_s", "M", True),
    ("lat1_10k", "latency p99, 1 subscriber at 10k msg/s", "p99_us", "us", False),
    ("lat1000_100", "latency p99, 1000 subscribers at 100 msg/s", "p99_us", "us", False),
    ("reqres100x16x2", "requests 100 x window 16, 2 responders (per server CPU-s)", "requests_per_server_cpu_s", "M", True),
    ("conns10k", "RSS per idle authenticated connection at 10,000", "rss_per_conn", "B", False),
]
print("| scenario | middleman | nats-server 2.9 ws | middleman advantage |")
print("|---|---|---|---|")
for row, label, key, unit, higher in spec:
    r = rows.get(row, {})
    m, n = med(r.get("mm", []), key), med(r.get("nats", []), key)
    ratio = m / n if n and n == n and m == m else float("nan")
    if not higher and m and m == m:
        ratio = n / m
    print(f"| {label} | {fmt(m, unit)} | {fmt(n, unit)} | {ratio:.2f}x |")
bad = [(row, p, r.get("lost"), r.get("out_of_order"), r.get("failed"))
       for row, d in rows.items() for p, rs in d.items() for r in rs
       if r.get("lost", "0") != "0" or r.get("out_of_order", "0") != "0" or "failed" in r]
print()
print(f"runs with loss, reordering or failure: {len(bad)} {bad if bad else ''}")
EOF
