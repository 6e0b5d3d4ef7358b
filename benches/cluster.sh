#!/usr/bin/env bash
# What a cluster costs: the same `middleman bench` rows against one middleman and
# against middleman nodes joined through a nats-server backplane, same machine,
# alternating order, RUNS rounds; medians, spreads (min-max of the rounds) and ratios
# in a table, with the date, load average, machine and versions.
#
#   bash benches/cluster.sh                   # RUNS=3, DUR=3s; results in target/cluster/
#   RUNS=1 DUR=2s bash benches/cluster.sh     # a quick check that every row runs
#   SINGLE_ONLY=1 bash benches/cluster.sh     # only the single-node baselines (no cluster)
#   SKIP_BUILD=1 bash benches/cluster.sh      # use target/release/middleman as it is
#
# Pairs (each row against its baseline in the same round, order alternating by round):
#   fanout64_100     fanout --subs 100 --size 64 --threads 2
#   fanout64_1       fanout --subs 1 --size 64
#   fanout1024_100   fanout --subs 100 --size 1024 --threads 2
#   reqres           reqres --requesters 100 --window 16 --responders 2
#   lat64_100_10k    the fan-out of fanout64_100 at a fixed 10k msg/s: CPU and p99
#   hist64_1         fanout --subs 1 --size 64 --subject hist.b: a topic with history
#                    ([[history]] prefix "hist.", size 1000); in the cluster kept in
#                    nats-server's JetStream (memory storage), every PUB a JetStream
#                    write and every delivery read from each node's ordered consumer
#   hist64_100       the same with --subs 100 --threads 2
#     _local: (hist rows, cluster only, after the pair) publisher and subscribers all
#             on node A: what history costs a subscriber on the publisher's own node
#             (every history message still goes through JetStream); CPU charged: A +
#             B + nats-server.
#     _single: one plain middleman (no --cluster), publisher and subscribers (requesters
#              and responders) on it; CPU charged: that process.
#     _cross:  nodes A and B joined to the nats-server (--cluster-name bench); the
#              publisher (requesters) on A, subscribers (responders) on B (--sub-url),
#              so every message crosses the backplane; CPU charged: A + B + nats-server.
#   reuseport        fanout --subs 100 --size 64 --threads 2 --ready-probe
#     _1: the plain single node; _2: two nodes on one port (--reuse-port) joined to the
#         nats-server; the kernel spreads the client's connections, so the publisher and
#         each subscriber land on either; CPU charged: both nodes + nats-server. Each
#         node also listens on a private port serving only /metrics (how it is told
#         apart from the other; idle otherwise).
# Cross-node and reuse-port runs start with the bench tool's ready probe (not counted):
# a subscription made on B must reach A through the backplane before A's messages get
# to it. Cluster nodes must first show `middleman_cluster_connected 1` and
# `middleman_cluster_nodes` = the other nodes' count on /metrics (bounded wait).
#
# Each round starts fresh: a nats-server (`nats-server -a 127.0.0.1 -p NATS_PORT -js`,
# its store in OUT/js), the
# single node and nodes A and B; the reuse-port pair has a fresh nats-server of its own
# (so each cluster sees only its own nodes). Only 127.0.0.1. Needs nats-server on PATH.
# Exits non-zero if any run lost or reordered messages, failed, or a node never joined.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${RUNS:-3}
DUR=${DUR:-3s}
SINGLE_ONLY=${SINGLE_ONLY:-0}
NATS_PORT=${NATS_PORT:-14291}
PORT_S=${PORT_S:-18781}
PORT_A=${PORT_A:-18782}
PORT_B=${PORT_B:-18783}
PORT_R=${PORT_R:-18784}
PORT_R1M=${PORT_R1M:-18785}
PORT_R2M=${PORT_R2M:-18786}
KEY=bench-service-key-0123456789
OUT=target/cluster
BIN=target/release/middleman
mkdir -p "$OUT"
# History for the hist* rows' topics: benches/history.toml (every node and the single
# one alike).
RESULTS="$OUT/results.txt"
: > "$RESULTS"

if [ "${SKIP_BUILD:-0}" != 1 ]; then
    cargo build --release --quiet
fi
[ -x "$BIN" ] || { echo "no $BIN" >&2; exit 1; }
command -v nats-server > /dev/null || { echo "nats-server is not on PATH" >&2; exit 1; }
if [ "$SINGLE_ONLY" != 1 ] && ! grep -q -- '--cluster-name' <<< "$("$BIN" --help)"; then
    echo "$BIN has no --cluster-name: build a middleman with the cluster runtime (or SINGLE_ONLY=1)" >&2
    exit 1
fi
ulimit -n "$(ulimit -Hn)"

NATS_PID=""
S_PID=""
A_PID=""
B_PID=""
R1_PID=""
R2_PID=""
stop() {
    local p
    for p in "$@"; do
        if [ -n "$p" ]; then
            kill "$p" 2>/dev/null || true
            wait "$p" 2>/dev/null || true
        fi
    done
}
stop_all() {
    stop "$S_PID" "$A_PID" "$B_PID" "$R1_PID" "$R2_PID" "$NATS_PID"
    S_PID="" A_PID="" B_PID="" R1_PID="" R2_PID="" NATS_PID=""
}
trap stop_all EXIT

die() {
    echo "cluster.sh: $*" >&2
    for f in "$OUT"/*.log; do
        [ -s "$f" ] && { echo "--- $f (last lines)" >&2; tail -5 "$f" >&2; }
    done
    exit 1
}

# wait_port PORT: until something accepts on 127.0.0.1:PORT (10 s at most).
wait_port() {
    for _ in $(seq 1 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    die "nothing listens on 127.0.0.1:$1 after 10 s"
}

# snapshot PORT: that port's /metrics (empty if it does not answer).
snapshot() {
    curl -s --max-time 2 "http://127.0.0.1:$1/metrics" || true
}

# metric NAME: the sum of NAME's samples (all labels) in the snapshot on stdin.
metric() {
    awk -v m="$1" '$1 == m || index($1, m "{") == 1 { s += $2 } END { printf "%d\n", s }'
}

# wait_joined PORT OTHERS: until the node on PORT is connected to nats-server and
# hears OTHERS other nodes (15 s at most).
wait_joined() {
    local port=$1 others=$2 m=""
    for _ in $(seq 1 150); do
        m=$(curl -s --max-time 2 "http://127.0.0.1:$port/metrics" || true)
        if grep -qx 'middleman_cluster_connected 1' <<< "$m" &&
            grep -qx "middleman_cluster_nodes $others" <<< "$m"; then
            return 0
        fi
        sleep 0.1
    done
    grep '^middleman_cluster' <<< "$m" >&2 || true
    die "node on port $port did not join (connected 1, $others other node(s)) within 15 s"
}

start_nats() {
    rm -rf "$OUT/js"
    nats-server -a 127.0.0.1 -p "$NATS_PORT" -js -sd "$OUT/js" > "$OUT/nats.log" 2>&1 &
    NATS_PID=$!
    wait_port "$NATS_PORT"
}

# start_mm NAME ARGS...: start a middleman (log in OUT/NAME.log); sets LAST_PID.
start_mm() {
    local name=$1
    shift
    "$BIN" "$@" --service-key "$KEY" --client-key "c-$KEY" --log-level warn \
        --max-connections 20000 --config benches/history.toml > "$OUT/$name.log" 2>&1 &
    LAST_PID=$!
}
CLUSTER=(--cluster "nats://127.0.0.1:$NATS_PORT" --cluster-name bench)

# counts PORT...: per port, `cl_in dropped accepted http` from one /metrics snapshot:
# messages in from the backplane, messages dropped (at-most-once), connections accepted
# and plain HTTP requests (the snapshots' own, to leave out of the accepted ones).
counts() {
    local p m
    for p in "$@"; do
        m=$(snapshot "$p")
        echo "$(metric middleman_cluster_messages_in_total <<< "$m")" \
            "$(metric middleman_cluster_dropped_total <<< "$m")" \
            "$(metric middleman_connections_accepted_total <<< "$m")" \
            "$(metric middleman_http_requests_total <<< "$m")"
    done
}

# one ROW ARGS...: run `middleman bench ARGS` (the caller puts --url, --server-pid ...
# in ARGS). CL_PORTS: the cluster nodes' metrics ports, for the backplane counters
# (`cl_in=`, `cl_dropped=`, summed) and the bench's connections each node accepted
# (`node_conns=A/B`).
one() {
    local row=$1
    shift
    local out rc=0 line extra="" before="" after
    if [ -n "${CL_PORTS:-}" ]; then
        # shellcheck disable=SC2086
        before=$(counts $CL_PORTS)
    fi
    out=$(timeout 300 "$BIN" bench "$@" --key "$KEY" --duration "$DUR" 2>&1) || rc=$?
    line=$(grep '^result:' <<< "$out" | tail -1 || true)
    if [ -z "$line" ]; then
        line="result: failed=1"
        tail -5 <<< "$out" >&2
    fi
    if [ -n "$before" ]; then
        # shellcheck disable=SC2086
        after=$(counts $CL_PORTS)
        extra=$(paste -d' ' <(echo "$before") <(echo "$after") | awk '
            { cin += $5 - $1; drop += $6 - $2
              conns = conns (NR > 1 ? "/" : "") (($7 - $3) - ($8 - $4)) }
            END { printf " cl_in=%d cl_dropped=%d node_conns=%s", cin, drop, conns }')
    fi
    echo "row=$row run=$RUN rc=$rc $line$extra" | tee -a "$RESULTS"
}

WS_S="ws://127.0.0.1:$PORT_S/"
WS_A="ws://127.0.0.1:$PORT_A/"
WS_B="ws://127.0.0.1:$PORT_B/"
WS_R="ws://127.0.0.1:$PORT_R/"

single() {
    CL_PORTS="" one "$1" "${@:2}" --url "$WS_S" --server-pid "$S_PID"
}
cross() {
    CL_PORTS="$PORT_A $PORT_B" one "$1" "${@:2}" --url "$WS_A" --sub-url "$WS_B" \
        --server-pid "$A_PID" --server-pid "$B_PID" --server-pid "$NATS_PID"
}
local_a() {
    CL_PORTS="$PORT_A $PORT_B" one "$1" "${@:2}" --url "$WS_A" \
        --server-pid "$A_PID" --server-pid "$B_PID" --server-pid "$NATS_PID"
}
reuse2() {
    CL_PORTS="$PORT_R1M $PORT_R2M" one "$1" "${@:2}" --url "$WS_R" \
        --server-pid "$R1_PID" --server-pid "$R2_PID" --server-pid "$NATS_PID"
}

# pair NAME BASE VARIANT ARGS...: NAME_BASE and NAME_VARIANT (functions single, cross,
# reuse2 with their row suffix), in alternating order by round.
pair() {
    local name=$1 base=$2 var=$3
    shift 3
    local bf=${base%%:*} bs=${base#*:} vf=${var%%:*} vs=${var#*:}
    if [ "$SINGLE_ONLY" = 1 ]; then
        "$bf" "${name}_$bs" "$@"
    elif [ $((RUN % 2)) -eq 1 ]; then
        "$bf" "${name}_$bs" "$@"
        "$vf" "${name}_$vs" "$@"
    else
        "$vf" "${name}_$vs" "$@"
        "$bf" "${name}_$bs" "$@"
    fi
}

{
    echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "machine: $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')), $(awk '/MemTotal/ {printf "%.0f GiB RAM", $2/1048576}' /proc/meminfo), Linux $(uname -r)"
    echo "versions: middleman $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo '+dirty') ($("$BIN" --version 2>/dev/null || echo '?')), $(nats-server --version)"
    echo "rounds: $RUNS, $DUR per row$([ "$SINGLE_ONLY" = 1 ] && echo ', single-node rows only' || true)"
    echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
} | tee "$OUT/machine.txt"
T0=$(date +%s)
for RUN in $(seq 1 "$RUNS"); do
    # Phase 1: the single node, and nodes A and B on a fresh nats-server.
    start_mm single --listen "127.0.0.1:$PORT_S"
    S_PID=$LAST_PID
    wait_port "$PORT_S"
    if [ "$SINGLE_ONLY" != 1 ]; then
        start_nats
        start_mm a --listen "127.0.0.1:$PORT_A" "${CLUSTER[@]}"
        A_PID=$LAST_PID
        start_mm b --listen "127.0.0.1:$PORT_B" "${CLUSTER[@]}"
        B_PID=$LAST_PID
        wait_port "$PORT_A"
        wait_port "$PORT_B"
        wait_joined "$PORT_A" 1
        wait_joined "$PORT_B" 1
    fi
    pair fanout64_100 single:single cross:cross fanout --subs 100 --size 64 --threads 2
    pair fanout64_1 single:single cross:cross fanout --subs 1 --size 64
    pair fanout1024_100 single:single cross:cross fanout --subs 100 --size 1024 --threads 2
    pair reqres single:single cross:cross reqres --requesters 100 --window 16 --responders 2
    pair lat64_100_10k single:single cross:cross fanout --subs 100 --size 64 --threads 2 --rate 10000
    pair hist64_1 single:single cross:cross fanout --subs 1 --size 64 --subject hist.b
    pair hist64_100 single:single cross:cross fanout --subs 100 --size 64 --threads 2 --subject hist.c
    if [ "$SINGLE_ONLY" != 1 ]; then
        local_a hist64_1_local fanout --subs 1 --size 64 --subject hist.d
        local_a hist64_100_local fanout --subs 100 --size 64 --threads 2 --subject hist.e
    fi
    stop "$A_PID" "$B_PID" "$NATS_PID"
    A_PID="" B_PID="" NATS_PID=""
    # Phase 2: two nodes on one port, on a fresh nats-server of their own.
    if [ "$SINGLE_ONLY" != 1 ]; then
        start_nats
        start_mm r1 --reuse-port --listen "127.0.0.1:$PORT_R" \
            --listen "127.0.0.1:$PORT_R1M?pages=metrics" "${CLUSTER[@]}"
        R1_PID=$LAST_PID
        start_mm r2 --reuse-port --listen "127.0.0.1:$PORT_R" \
            --listen "127.0.0.1:$PORT_R2M?pages=metrics" "${CLUSTER[@]}"
        R2_PID=$LAST_PID
        wait_port "$PORT_R1M"
        wait_port "$PORT_R2M"
        wait_joined "$PORT_R1M" 1
        wait_joined "$PORT_R2M" 1
    fi
    pair reuseport single:1 reuse2:2 fanout --subs 100 --size 64 --threads 2 --ready-probe
    stop_all
done
{
    echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "took: $(($(date +%s) - T0)) s"
} | tee -a "$OUT/machine.txt"

rc=0
python3 - "$RESULTS" "$OUT/machine.txt" <<'EOF' > "$OUT/table.md" || rc=$?
import statistics
import sys
sys.path.insert(0, "benches")
from bench_table import read_results, med, fmt, cell, held
rows = {}
for kv in read_results(sys.argv[1]):
    if "row" in kv:
        rows.setdefault(kv["row"], []).append(kv)

def ratio(a, b):
    return f"{a / b:.2f}x" if a == a and b == b and b else "n/a"

def charged(runs):
    n = {r.get("server_pids", "?") for r in runs}
    return ",".join(sorted(n))

print(open(sys.argv[2]).read().rstrip())
print()
print("Medians of the rounds, (min-max) in brackets. 'per CPU-s': deliveries (requests) per")
print("second of CPU of every process charged (single: the one middleman; cross: nodes A and B")
print("and nats-server; reuse-port 2: both nodes and nats-server). 'per wall s': the same per")
print("second of the run. 'CPU': cores busy on average over the charged processes. Ratios:")
print("row / its baseline in the same rounds.")
print()
pairs = [
    ("fanout64_100", "fan-out 64 B, 100 subscribers", "single", "cross", "deliveries"),
    ("fanout64_1", "fan-out 64 B, 1 subscriber", "single", "cross", "deliveries"),
    ("fanout1024_100", "fan-out 1 KiB, 100 subscribers", "single", "cross", "deliveries"),
    ("reqres", "requests, 100 requesters x window 16, 2 responders", "single", "cross", "requests"),
    ("reuseport", "fan-out 64 B, 100 subscribers, one port", "1", "2", "deliveries"),
    ("hist64_1", "fan-out 64 B to a history topic, 1 subscriber", "single", "cross", "deliveries"),
    ("hist64_1", "the same, subscriber on the publisher's node", "single", "local", "deliveries"),
    ("hist64_100", "fan-out 64 B to a history topic, 100 subscribers", "single", "cross", "deliveries"),
    ("hist64_100", "the same, subscribers on the publisher's node", "single", "local", "deliveries"),
]
print("| row | scenario | processes | per CPU-s | vs baseline | per wall s | vs baseline | CPU | p99 |")
print("|---|---|---|---|---|---|---|---|---|")
for name, label, base, var, what in pairs:
    b, v = rows.get(f"{name}_{base}", []), rows.get(f"{name}_{var}", [])
    kc, kw = f"{what}_per_server_cpu_s", f"{what}_per_s"
    for suffix, rs in ((base, b), (var, v)):
        is_var = suffix == var
        if not is_var and var == "local":
            continue
        rc = ratio(med(v, kc), med(b, kc)) if is_var else ""
        rw = ratio(med(v, kw), med(b, kw)) if is_var else ""
        print(f"| {name}_{suffix} | {label} | {charged(rs)} | {cell(rs, kc, 'Mk')} | {rc} | {cell(rs, kw, 'Mk')} | {rw} | {cell(rs, 'server_cpu_util', 'cores')} | {cell(rs, 'p99_us', 'us')} |")

print()
print("Fixed load, 64 B to 100 subscribers at 10k msg/s (1M deliveries/s offered): CPU of the")
print("charged processes (cores) and end-to-end latency; 'held': every round achieved >= 98%.")
print()
print("| row | CPU | vs single | p50 | p99 | p99.9 | achieved msg/s | held | pub late p99 |")
print("|---|---|---|---|---|---|---|---|---|")
b, v = rows.get("lat64_100_10k_single", []), rows.get("lat64_100_10k_cross", [])
for suffix, rs in (("single", b), ("cross", v)):
    r = ratio(med(v, "server_cpu_util"), med(b, "server_cpu_util")) if suffix == "cross" else ""
    print(f"| lat64_100_10k_{suffix} | {cell(rs, 'server_cpu_util', 'cores')} | {r} | {cell(rs, 'p50_us', 'us')} | {cell(rs, 'p99_us', 'us')} | {cell(rs, 'p999_us', 'us')} | {cell(rs, 'achieved_rate', 'rate')} | {held(rs)} | {cell(rs, 'late_p99_us', 'us')} |")
pv, pb = med(v, "p99_us"), med(b, "p99_us")
if pv == pv and pb == pb:
    d = pv - pb
    print(f"\np99 cross / single: {ratio(pv, pb)} ({fmt(pv, 'us')} vs {fmt(pb, 'us')}, {'+' if d >= 0 else '-'}{fmt(abs(d), 'us')})")

cl = [(row, r) for row, rs in rows.items() for r in rs if "cl_in" in r]
if cl:
    print()
    print("Backplane per cluster run (messages in from nats-server summed over the nodes /")
    print("dropped; connections of the bench accepted per node):")
    for row, rs in rows.items():
        rs = [r for r in rs if "cl_in" in r]
        if rs:
            rs.sort(key=lambda x: int(x.get("run", 0)))
            parts = [f"{r['cl_in']}/{r['cl_dropped']}" + (f" conns {r['node_conns']}" if "node_conns" in r else "") for r in rs]
            print(f"  {row}: {' | '.join(parts)}")

each = [(row, [r for r in rs if "server_cpu_each_s" in r]) for row, rs in rows.items()]
each = [(row, rs) for row, rs in each if rs]
if each:
    print()
    print("Where the CPU went (median share of each charged process over the rounds; cross,")
    print("local: node A, node B, nats-server; reuse-port 2: the two nodes, nats-server), and")
    print("the CPU per delivery (request) of all of them:")
    for row, rs in each:
        shares, per = [], []
        for r in rs:
            secs = [float(x) for x in r["server_cpu_each_s"].split("/")]
            tot = sum(secs)
            n = float(r.get("deliveries", r.get("answered", "nan")) or "nan")
            if tot > 0:
                shares.append([x / tot for x in secs])
                per.append(tot / n * 1e6 if n == n and n > 0 else float("nan"))
        if shares:
            cols = list(zip(*shares))
            parts = " / ".join(f"{100 * statistics.median(c):.0f}%" for c in cols)
            unit = "request" if "answered" in rs[0] else "delivery"
            print(f"  {row}: {parts}; {statistics.median(per):.2f} µs per {unit}")

print()
print("Every round, in order (per CPU-s; fixed load: CPU and p99):")
for row in rows:
    rs = sorted(rows[row], key=lambda x: int(x.get("run", 0)))
    if rs and "rate_held" in rs[0]:
        v = [f"{fmt(float(x.get('server_cpu_util', 'nan')), 'cores')} cores, p99 {fmt(float(x.get('p99_us', 'nan')), 'us')}" for x in rs]
    else:
        key = next((k for k in ("deliveries_per_server_cpu_s", "requests_per_server_cpu_s") if rs and k in rs[0]), None)
        v = [fmt(float(x.get(key, "nan")), "Mk") if key else "failed" for x in rs]
    print(f"  {row}: {' | '.join(v)}")

bad = [(row, r.get("run"), r.get("lost"), r.get("out_of_order"), r.get("rc"), r.get("failed"))
       for row, rs in rows.items() for r in rs
       if r.get("lost", "0") != "0" or r.get("out_of_order", "0") != "0"
       or r.get("rc", "0") != "0" or "failed" in r or r.get("errors", "0") != "0"]
total = sum(len(rs) for rs in rows.values())
print()
print(f"runs: {total}; with loss, reordering, errors, failure or non-zero exit: {len(bad)} {bad if bad else ''}")
sys.exit(1 if bad or total == 0 else 0)
EOF
cat "$OUT/table.md"
exit "$rc"
