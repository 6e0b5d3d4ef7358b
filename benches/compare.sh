#!/usr/bin/env bash
# Side-by-side load runs: middleman vs nats-server (WebSocket listener), same client
# (`middleman bench`), same machine, alternating, RUNS rounds; medians and the spread
# (min-max of the rounds) in tables, with the date, load average and machine.
#
#   bash benches/compare.sh            # RUNS=3 by default; results in target/compare/
#   RUNS=5 DUR=5s bash benches/compare.sh
#   RUNS=1 DUR=1s bash benches/compare.sh   # a quick check that every row runs
#   ONLY='fanout64_1|pipe64_1' RUNS=1 bash benches/compare.sh   # only these rows
#   TABLES_ONLY=1 bash benches/compare.sh   # the tables again from target/compare/results.txt
#
# Load shapes (`shape=` on every result line, see `middleman bench fanout --help`):
#   window256    the publisher stays <= 256 messages ahead of the slowest subscriber,
#                16 messages per write (the original rows)
#   pipeline16k  16 KiB of messages per write, <= 100000 deliveries in flight
#   pubs100x10-  100 publishers, one topic each, 10 subscribers per topic
#   fixed10k     a fixed offered load (10k msg/s): server CPU as a fraction of one core
#                and p50/p99/p99.9 latency, i.e. what to size a machine with; the two
#                latency rows also run `middleman bench floor` (no server, a relay that
#                only copies bytes): the latency this machine allows
# The no-work relay: beside the fan-out rows with 1 and 100 subscribers, in both shapes,
# each round also runs `middleman bench floor` with the same arguments (no server: a
# relay process that copies each read to every subscriber socket, the same flow control
# and receivers; `middleman bench floor --help`), and the table states middleman's
# deliveries per CPU-second as a fraction of the relay's ('mm / relay').
# A full run (RUNS=3, DUR=3s) takes about 10 minutes on 2 cores (a round with DUR=1s: 50 s).
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
# TABLES_ONLY=1: no runs (the block up to the tables, left unindented for its heredocs).
if [ -z "${TABLES_ONLY:-}" ]; then
: > "$RESULTS"

cargo build --release --quiet
BIN=${CARGO_TARGET_DIR:-target}/release/middleman
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

# History (PROTOCOL.md §9.5) for the hist* rows' topics: benches/history.toml.

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
        --max-connections 20000 --log-level warn --config benches/history.toml > "$OUT/mm.log" 2>&1 &
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

# record ROW_NAME PROTO ARGS...: run `middleman bench ARGS` and append its result line
# (or a failed=1 line, with the output's tail on stderr) to the results as ROW_NAME's.
# ONLY (a bash regular expression over row names) skips every other row.
record() {
    local row=$1 proto=$2
    shift 2
    if [ -n "${ONLY:-}" ] && ! [[ $row =~ ^($ONLY)$ ]]; then
        return 0
    fi
    local out rc=0 line
    out=$(timeout 300 "$BIN" bench "$@" 2>&1) || rc=$?
    line=$(printf '%s\n' "$out" | grep '^result:' | tail -1)
    if [ -z "$line" ]; then
        line="result: proto=$proto failed=1"
        printf '%s\n' "$out" | tail -5 >&2
    fi
    echo "row=$row run=$RUN rc=$rc $line" | tee -a "$RESULTS"
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
    record "$row" "$proto" "$@" --proto "$proto" --url "$url" --key "$KEY" --server-pid "$pid"
}

# floor ROW_NAME ARGS...: `middleman bench floor ARGS` (no server) as ROW_NAME's floor.
floor() {
    local row=$1
    shift
    record "$row" floor floor "$@"
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

# with_floor ROW_NAME ARGS...: `fanout ARGS` against both servers and `floor ARGS` (the
# no-work relay, same shape) as ROW_NAME's; the relay last in odd rounds, first in even.
with_floor() {
    local row=$1
    shift
    if [ $((RUN % 2)) -eq 0 ]; then
        floor "$row" "$@"
    fi
    both "$row" fanout "$@"
    if [ $((RUN % 2)) -eq 1 ]; then
        floor "$row" "$@"
    fi
}

{
    echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "machine: $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')), $(awk '/MemTotal/ {printf "%.0f GiB RAM", $2/1048576}' /proc/meminfo), Linux $(uname -r)"
    echo "servers: middleman $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo '+dirty'), $(nats-server --version)"
    echo "rounds: $RUNS, $DUR per row"
    echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
} | tee "$OUT/machine.txt"
T0=$(date +%s)
for RUN in $(seq 1 "$RUNS"); do
    start_servers
    both conns10k conns --conns 10000 --hold 2s
    # window256: the original shape.
    for size in 64 1024; do
        with_floor "fanout${size}_1" --subs 1 --size "$size" --duration "$DUR"
        with_floor "fanout${size}_100" --subs 100 --size "$size" --duration "$DUR" --threads 2
        both "fanout${size}_1000" fanout --subs 1000 --size "$size" --duration "$DUR" --threads 2
    done
    both fanout64_1_pack fanout --subs 1 --size 64 --duration "$DUR" --pack
    # pipeline16k: deep pipeline, as an independent client measured (issue 11).
    with_floor pipe64_1 --subs 1 --size 64 --duration "$DUR" --write-kib 16 --inflight 100000
    with_floor pipe64_100 --subs 100 --size 64 --duration "$DUR" --write-kib 16 --inflight 100000 --threads 2
    with_floor pipe1024_100 --subs 100 --size 1024 --duration "$DUR" --write-kib 16 --inflight 100000 --threads 2
    both pipe1024_1000 fanout --subs 1000 --size 1024 --duration "$DUR" --write-kib 16 --inflight 100000 --threads 2
    # Many publishers: 100 topics, 10 subscribers each.
    both pubs64_100x10 fanout --publishers 100 --subs 10 --size 64 --duration "$DUR" --threads 2
    # Fixed load: cost (server CPU utilisation) and latency at an offered rate.
    both lat1_10k fanout --subs 1 --rate 10000 --duration "$DUR"
    both fixed64_100_10k fanout --subs 100 --rate 10000 --duration "$DUR" --threads 2
    both lat1000_100 fanout --subs 1000 --rate 100 --duration "$DUR" --threads 2
    # The machine's floor for the two latency rows: the same topology with no server,
    # a relay process that only copies bytes (`middleman bench floor --help`).
    floor lat1_10k --subs 1 --rate 10000 --duration "$DUR"
    floor lat1000_100 --subs 1000 --rate 100 --duration "$DUR" --threads 2
    both reqres100x16x2 reqres --requesters 100 --window 16 --responders 2 --duration "$DUR"
    # History: the same fan-out to a topic that keeps history (each PUB stored with
    # offset and epoch), middleman only, beside its plain rows above.
    one hist64_1 mm fanout --subs 1 --size 64 --duration "$DUR" --subject hist.b
    one hist64_100 mm fanout --subs 100 --size 64 --duration "$DUR" --threads 2 --subject hist.b
    stop_servers
done
{
    echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "took: $(( $(date +%s) - T0 )) s"
} | tee -a "$OUT/machine.txt"
fi

python3 - "$RESULTS" "$OUT/machine.txt" <<'EOF' | tee "$OUT/table.md"
import statistics
import sys
sys.path.insert(0, "benches")
from bench_table import read_results, med, fmt, cell, held, vals
rows = {}
for kv in read_results(sys.argv[1]):
    proto = kv.get("proto")
    if proto is None or "row" not in kv:
        continue
    rows.setdefault(kv["row"], {}).setdefault(proto, []).append(kv)

def shape(r):
    s = {x.get("shape", "?") for x in r.get("mm", []) + r.get("nats", [])}
    return ",".join(sorted(s)) or "?"

print(open(sys.argv[2]).read().rstrip())
print()
print("Medians of the rounds, (min-max) in brackets. Throughput is per server CPU-second.")
print()
thr = [
    ("fanout64_1", "fan-out 64 B, 1 subscriber", "deliveries_per_server_cpu_s"),
    ("fanout64_1_pack", "fan-out 64 B, 1 subscriber, 16 PUBs per WebSocket message", "deliveries_per_server_cpu_s"),
    ("fanout64_100", "fan-out 64 B, 100 subscribers", "deliveries_per_server_cpu_s"),
    ("fanout64_1000", "fan-out 64 B, 1000 subscribers", "deliveries_per_server_cpu_s"),
    ("fanout1024_1", "fan-out 1 KiB, 1 subscriber", "deliveries_per_server_cpu_s"),
    ("fanout1024_100", "fan-out 1 KiB, 100 subscribers", "deliveries_per_server_cpu_s"),
    ("fanout1024_1000", "fan-out 1 KiB, 1000 subscribers", "deliveries_per_server_cpu_s"),
    ("pipe64_1", "fan-out 64 B, 1 subscriber", "deliveries_per_server_cpu_s"),
    ("pipe64_100", "fan-out 64 B, 100 subscribers", "deliveries_per_server_cpu_s"),
    ("pipe1024_100", "fan-out 1 KiB, 100 subscribers", "deliveries_per_server_cpu_s"),
    ("pipe1024_1000", "fan-out 1 KiB, 1000 subscribers", "deliveries_per_server_cpu_s"),
    ("pubs64_100x10", "100 publishers x 10 subscribers each, 64 B", "deliveries_per_server_cpu_s"),
    ("reqres100x16x2", "requests, 100 requesters x window 16, 2 responders", "requests_per_server_cpu_s"),
]
def per_round(r, key):
    """middleman / relay in each round that has both (by run number)."""
    fl = {x.get("run"): vals([x], key) for x in r.get("floor", [])}
    out = []
    for x in r.get("mm", []):
        m, f = vals([x], key), fl.get(x.get("run"), [])
        if m and f and f[0] > 0:
            out.append(m[0] / f[0])
    return out

print("'no-work relay' is `middleman bench floor` with the same arguments in the same rounds: no")
print("server, a relay process that copies each read to every subscriber socket (no framing: a")
print("message is its body's bytes only), the same flow control and receivers; 'mm / relay' is")
print("middleman's deliveries per CPU-second as a fraction of the relay's, the ratio of the medians")
print("(the rounds' own ratios in brackets).")
print()
print("| row | shape | scenario | middleman | nats-server ws | mm / NATS | no-work relay | mm / relay |")
print("|---|---|---|---|---|---|---|---|")
for row, label, key in thr:
    r = rows.get(row, {})
    m, n = med(r.get("mm", []), key), med(r.get("nats", []), key)
    ratio = f"{m / n:.2f}x" if n and n == n and m == m else "n/a"
    fl, frac = "", ""
    if r.get("floor"):
        f = med(r["floor"], key)
        fl = cell(r["floor"], key, "M")
        frac = f"{m / f:.2f}" if f and f == f and m == m else "n/a"
        rounds = per_round(r, key)
        if len(rounds) > 1:
            frac += f" ({min(rounds):.2f}-{max(rounds):.2f})"
    print(f"| {row} | {shape(r)} | {label} | {cell(r.get('mm', []), key, 'M')} | {cell(r.get('nats', []), key, 'M')} | {ratio} | {fl} | {frac} |")

print()
print("History (middleman only): the same window256 fan-out to a topic with a `[[history]]` rule")
print("(size 1000), beside the plain row of the same rounds; 'history / plain' is the ratio of")
print("deliveries per server CPU-second (1.00x: a history PUB costs what a plain one does): of")
print("the medians, and the median (min-max) of each round's own ratio, the figure to read on a")
print("shared machine (a round runs both rows a minute apart, the rounds are minutes apart).")
print()
print("| row | scenario | plain | history | history / plain |")
print("|---|---|---|---|---|")
for hist, plain, label in (("hist64_1", "fanout64_1", "fan-out 64 B, 1 subscriber"),
                           ("hist64_100", "fanout64_100", "fan-out 64 B, 100 subscribers")):
    key = "deliveries_per_server_cpu_s"
    h, p = rows.get(hist, {}).get("mm", []), rows.get(plain, {}).get("mm", [])
    mh, mp = med(h, key), med(p, key)
    ratio = f"{mh / mp:.2f}x" if mh == mh and mp == mp and mp else "n/a"
    byrun = {x.get("run"): vals([x], key) for x in p}
    rounds = [vals([x], key)[0] / byrun[x.get("run")][0] for x in h
              if vals([x], key) and byrun.get(x.get("run")) and byrun[x.get("run")][0] > 0]
    if rounds:
        ratio += f"; per round {statistics.median(rounds):.2f}x ({min(rounds):.2f}-{max(rounds):.2f})"
    print(f"| {hist} | {label} | {cell(p, key, 'M')} | {cell(h, key, 'M')} | {ratio} |")
print()
print("Fixed load: the server's CPU use (fraction of one core; nats-server may use both) and")
print("end-to-end latency at an offered rate; 'held' says whether every round achieved it (>= 98%).")
print("'pub late' is how far behind its schedule the publisher wrote (p99): when it is large the")
print("client (or the machine) could not pace the load, and it came in bursts.")
print()
fixed = [
    ("lat1_10k", "64 B, 1 subscriber, 10k msg/s"),
    ("fixed64_100_10k", "64 B, 100 subscribers, 10k msg/s (1M deliveries/s)"),
    ("lat1000_100", "64 B, 1000 subscribers, 100 msg/s"),
]
print("'no-work relay' is `middleman bench floor` in the same rounds: no server, a relay process that")
print("copies each read to every subscriber socket, the same receivers; its latency is what wake-ups")
print("and loopback TCP on this machine allow, and its CPU is what the writes alone cost.")
print()
print("| row | shape | scenario | server | CPU | p50 | p99 | p99.9 | achieved msg/s | held | pub late p99 |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for row, label in fixed:
    r = rows.get(row, {})
    for proto, name in (("mm", "middleman"), ("nats", "nats-server"), ("floor", "no-work relay")):
        rs = r.get(proto, [])
        if proto == "floor" and not rs:
            continue
        print(f"| {row} | {shape(r)} | {label} | {name} | {cell(rs, 'server_cpu_util', '%')} | {cell(rs, 'p50_us', 'us')} | {cell(rs, 'p99_us', 'us')} | {cell(rs, 'p999_us', 'us')} | {cell(rs, 'achieved_rate', 'rate')} | {held(rs)} | {cell(rs, 'late_p99_us', 'us')} |")
    m, n = med(r.get("mm", []), "server_cpu_util"), med(r.get("nats", []), "server_cpu_util")
    if m == m and n == n and m > 0:
        print(f"| {row} | | CPU nats / mm | | {n / m:.2f}x | | | | | | |")

print()
r = rows.get("conns10k", {})
m, n = med(r.get("mm", []), "rss_per_conn"), med(r.get("nats", []), "rss_per_conn")
ratio = f"{n / m:.2f}x smaller" if m and m == m and n == n else "n/a"
print(f"RSS per idle authenticated connection at 10,000: middleman {cell(r.get('mm', []), 'rss_per_conn', 'B')}, nats-server {cell(r.get('nats', []), 'rss_per_conn', 'B')}, {ratio}")

print()
print("Every round, in order (throughput rows: per server CPU-second; fixed: CPU and p99):")
for row in rows:
    for proto in ("mm", "nats", "floor"):
        if proto not in rows[row]:
            continue
        rs = sorted(rows[row].get(proto, []), key=lambda x: int(x.get("run", 0)))
        if "rate_held" in (rs[0] if rs else {}):
            v = [f"{fmt(float(x.get('server_cpu_util', 'nan')), '%')} cpu, p99 {fmt(float(x.get('p99_us', 'nan')), 'us')}" for x in rs]
        else:
            key = next((k for k in ("deliveries_per_server_cpu_s", "requests_per_server_cpu_s", "rss_per_conn") if rs and k in rs[0]), None)
            unit = "B" if key == "rss_per_conn" else "M"
            v = [fmt(float(x.get(key, "nan")), unit) if key else "failed" for x in rs]
        print(f"  {row} {proto}: {' | '.join(v)}")

bad = [(row, p, r.get("run"), r.get("lost"), r.get("out_of_order"), r.get("rc"), r.get("failed"))
       for row, d in rows.items() for p, rs in d.items() for r in rs
       if r.get("lost", "0") != "0" or r.get("out_of_order", "0") != "0"
       or r.get("rc", "0") != "0" or "failed" in r]
total = sum(len(rs) for d in rows.values() for rs in d.values())
full = sum(int(r.get("relay_full", "0")) for d in rows.values() for r in d.get("floor", []))
print()
print(f"no-work relay writes that found a subscriber socket full (and waited): {full}")
print(f"runs: {total}; with loss, reordering, failure or non-zero exit: {len(bad)} {bad if bad else ''}")
EOF
