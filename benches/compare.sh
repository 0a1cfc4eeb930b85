#!/usr/bin/env bash
# Side-by-side benchmark: luamilter running examples/bench.lua against the
# native baseline (examples/native_baseline.rs) doing the same in plain Rust.
# Both servers run at once; every cell of the grid (transport x body size x
# concurrency) is measured on each server in turn with the same generator
# settings and a fixed message count, then the script prints the ratios
# luamilter/native. BENCHMARKS.md explains every figure.
#
# Settings (environment variables):
#   CANDIDATE=luamilter|native  the server compared with the baseline; "native"
#                               runs a second baseline (a self-test of this script)
#   TRANSPORTS="unix tcp"  BODIES="2k 100k"  CONCURRENCY="1 8 64"  HOLD="1 100 1000"
#   ROUNDS=1       rounds over the grid (medians are reported; the first server alternates)
#   QUICK=1        one tenth of the message counts (smoke run)
#   PER_CONN=1     messages per connection;  SPAM=0  fraction from spam@bad.example
#   PORT_BASE=17000  TCP ports PORT_BASE (native) and PORT_BASE+1 (candidate)
#   NO_BUILD=1     skip `cargo build --release --bins --examples`
#   OUT=dir        where the JSON reports, server logs and summary.txt go (default: a new /tmp dir)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REL=${CARGO_TARGET_DIR:-$ROOT/target}/release
GEN=$REL/luamilter
CANDIDATE=${CANDIDATE:-luamilter}
TRANSPORTS=${TRANSPORTS:-unix tcp}
BODIES=${BODIES:-2k 100k}
CONCURRENCY=${CONCURRENCY:-1 8 64}
HOLD=${HOLD:-1 100 1000}
ROUNDS=${ROUNDS:-1}
PORT_BASE=${PORT_BASE:-17000}
OUT=${OUT:-$(mktemp -d /tmp/luamilter-bench.XXXXXX)}
mkdir -p "$OUT"

case $CANDIDATE in luamilter | native) ;; *)
    echo "CANDIDATE must be luamilter or native" >&2
    exit 2
    ;;
esac
command -v python3 >/dev/null || {
    echo "compare.sh needs python3 for the summary" >&2
    exit 2
}
if [[ ${NO_BUILD:-0} != 1 ]]; then
    (cd "$ROOT" && cargo build --release --bins --examples)
fi

# Messages per run: fixed counts, so every run is bounded in time.
count() { # concurrency body
    local n
    case $1 in 1) n=4000 ;; 8) n=10000 ;; *) n=20000 ;; esac
    [[ $2 == 2k ]] || n=$((n / 2))
    [[ ${QUICK:-0} == 1 ]] && n=$((n / 10))
    echo "$n"
}

socket_for() { # role transport
    local port=$PORT_BASE
    [[ $1 == candidate ]] && port=$((PORT_BASE + 1))
    case $2 in
    unix) echo "unix:$OUT/$1.sock" ;;
    tcp) echo "inet:$port@127.0.0.1" ;;
    *)
        echo "unknown transport $2" >&2
        exit 2
        ;;
    esac
}

declare -A PID=()
cleanup() {
    for role in "${!PID[@]}"; do kill -TERM "${PID[$role]}" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT

start() { # role transport
    local role=$1 spec kind=native
    spec=$(socket_for "$1" "$2")
    [[ $role == candidate ]] && kind=$CANDIDATE
    if [[ $kind == native ]]; then
        "$REL/examples/native_baseline" "$spec" 2>>"$OUT/$role.log" &
    else
        sed -e "s|^listen = .*|listen = \"$spec\"|" -e "s|^dirs = .*|dirs = [\"$ROOT/examples\"]|" \
            "$ROOT/benches/bench.toml" >"$OUT/$role.toml"
        "$REL/luamilter" run --config "$OUT/$role.toml" 2>>"$OUT/$role.log" &
    fi
    PID[$role]=$!
    # Ready when a connection negotiates.
    for _ in $(seq 100); do
        if "$GEN" bench -s "$spec" --hold 1 --hold-secs 0 --timeout 1 >/dev/null 2>&1; then
            return
        fi
        kill -0 "${PID[$role]}" 2>/dev/null || {
            echo "$role ($kind) exited; see $OUT/$role.log" >&2
            exit 1
        }
        sleep 0.1
    done
    echo "$role ($kind) is not answering on $spec" >&2
    exit 1
}

stop() { # role
    kill -TERM "${PID[$1]}" 2>/dev/null || true
    wait "${PID[$1]}" 2>/dev/null || true
    unset "PID[$1]"
}

measure() { # role transport body concurrency round
    local n file
    n=$(count "$4" "$3")
    file="$OUT/run-$2-$3-c$4-$1-r$5.json"
    "$GEN" bench -s "$(socket_for "$1" "$2")" -c "$4" -n "$n" -m "${PER_CONN:-1}" -b "$3" \
        --spam-fraction "${SPAM:-0}" --server-pid "${PID[$1]}" --json >"$file" ||
        echo "warning: $1 $2 body=$3 c=$4: the generator reported errors ($file)" >&2
}

echo "results in $OUT" >&2
for transport in $TRANSPORTS; do
    start native "$transport"
    start candidate "$transport"
    for role in native candidate; do # warm-up, not reported
        "$GEN" bench -s "$(socket_for $role "$transport")" -c 8 -n 500 >/dev/null
    done
    cell=0
    for round in $(seq "$ROUNDS"); do
        for body in $BODIES; do
            for c in $CONCURRENCY; do
                echo "  $transport body=$body c=$c round $round" >&2
                if (((cell + round) % 2)); then order="candidate native"; else order="native candidate"; fi
                for role in $order; do measure "$role" "$transport" "$body" "$c" "$round"; done
                cell=$((cell + 1))
            done
        done
    done
    stop native
    stop candidate
done

# Memory with idle connections: a fresh server each, connections opened in rising numbers.
for role in native candidate; do
    start "$role" unix
    for k in $HOLD; do
        echo "  $role holding $k connections" >&2
        "$GEN" bench -s "$(socket_for "$role" unix)" --hold "$k" --hold-secs 1 -c 64 \
            --server-pid "${PID[$role]}" --json >"$OUT/hold-$role-$k.json" ||
            echo "warning: $role hold $k: errors" >&2
    done
    stop "$role"
done

CANDIDATE=$CANDIDATE python3 - "$OUT" <<'PY' | tee "$OUT/summary.txt"
import glob, json, os, platform, re, statistics, sys, time

out = sys.argv[1]
cand = os.environ["CANDIDATE"]
runs = {}
for path in glob.glob(f"{out}/run-*.json"):
    m = re.search(r"run-(\w+)-(\w+)-c(\d+)-(native|candidate)-r\d+\.json$", path)
    with open(path) as f:
        text = f.read()
    if not text.strip():
        continue
    r = json.loads(text)
    key = (m.group(1), m.group(2), int(m.group(3)))
    runs.setdefault(key, {}).setdefault(m.group(4), []).append(r)

def med(reports, get):
    vals = [v for v in (get(r) for r in reports) if v is not None]
    return statistics.median(vals) if vals else None

def ratio(a, b):
    return f"{a / b:5.2f}" if a and b else "    -"

def num(v, fmt):
    return format(v, fmt) if v is not None else "-"

print(f"luamilter bench: candidate={cand} vs native baseline, {time.strftime('%Y-%m-%d %H:%M')}, "
      f"{platform.node()} {platform.machine()} {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}")
print()
head = (f"{'transport':9} {'body':5} {'conc':>4} | {'native msg/s':>12} {'cand msg/s':>10} {'ratio':>5} | "
        f"{'native p99ms':>12} {'cand p99ms':>10} {'ratio':>5} | {'native msg/cpu-s':>16} "
        f"{'cand msg/cpu-s':>14} {'ratio':>5} | {'gen cpu':>7} {'errors':>6}")
print(head)
print("-" * len(head))
order = {"unix": 0, "tcp": 1}
for key in sorted(runs, key=lambda k: (order.get(k[0], 9), k[1] != "2k", k[2])):
    n, c = runs[key].get("native", []), runs[key].get("candidate", [])
    tput = [med(x, lambda r: r["messages_per_sec"]) for x in (n, c)]
    p99 = [med(x, lambda r: (r["latency_ms"] or {}).get("p99")) for x in (n, c)]
    eff = [med(x, lambda r: (r["server"] or {}).get("messages_per_cpu_sec")) for x in (n, c)]
    gen = max([r["client_cpu"]["share"] for r in n + c] or [0])
    errors = sum(r["errors"] for r in n + c)
    print(f"{key[0]:9} {key[1]:5} {key[2]:>4} | {num(tput[0], '12.0f')} {num(tput[1], '10.0f')} "
          f"{ratio(tput[1], tput[0])} | {num(p99[0], '12.3f')} {num(p99[1], '10.3f')} {ratio(p99[1], p99[0])} | "
          f"{num(eff[0], '16.0f')} {num(eff[1], '14.0f')} {ratio(eff[1], eff[0])} | "
          f"{gen * 100:6.1f}% {errors:>6}")

print()
print(f"{'idle conns':>10} | {'native VmRSS KiB':>16} {'VmHWM':>8} | {'cand VmRSS KiB':>14} {'VmHWM':>8} | errors")
holds = {}
for path in glob.glob(f"{out}/hold-*.json"):
    m = re.search(r"hold-(native|candidate)-(\d+)\.json$", path)
    with open(path) as f:
        text = f.read()
    if text.strip():
        holds.setdefault(int(m.group(2)), {})[m.group(1)] = json.loads(text)
for k in sorted(holds):
    row = []
    errors = 0
    for role in ("native", "candidate"):
        r = holds[k].get(role)
        s = (r or {}).get("server") or {}
        errors += (r or {}).get("errors", 0)
        row += [s.get("rss_kib"), s.get("hwm_kib")]
    print(f"{k:>10} | {num(row[0], '16d')} {num(row[1], '8d')} | {num(row[2], '14d')} {num(row[3], '8d')} | {errors}")
PY
