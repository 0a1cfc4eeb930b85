#!/usr/bin/env bash
# Side by side: the native baseline and two luamilter builds ("before" and "after", e.g. two
# commits), each running examples/bench.lua with benches/bench.toml, measured in turn by the same
# generator. For a change's cost: build both (cargo build --release --bins --examples in two
# worktrees with their own CARGO_TARGET_DIR), then
#
#   BEFORE=/path/to/old/target/release BEFORE_EXAMPLES=/path/to/old/examples \
#   AFTER=target/release benches/versus.sh
#
# Settings: TRANSPORTS ("unix tcp"), CONC ("1 8 64"), ROUNDS (2), OUT (a new /tmp dir),
# POLICY (`trivial`: examples/bench.lua; `full`: the every-stage examples/bench_full.lua, and
# the baseline's `full` mode), QUICK=1 (a fifth of the messages),
# AFTER_EXTRA / BEFORE_EXTRA (TOML appended to that side's config, replacing its [trace]
# section when it has one; printf escapes allowed; BEFORE_EXTRA=' ' just drops [trace] for a
# build older than it). Prints medians and the ratios; msg/cpu-s
# (server CPU) is the steadier figure on a shared machine.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
AFTER=${AFTER:-$ROOT/target/release}
BEFORE=${BEFORE:?set BEFORE to the release directory of the other build}
BEFORE_EXAMPLES=${BEFORE_EXAMPLES:-$ROOT/examples}
GEN=$AFTER/luamilter
OUT=${OUT:-$(mktemp -d /tmp/luamilter-versus.XXXXXX)}
TRANSPORTS=${TRANSPORTS:-unix tcp}
CONC=${CONC:-1 8 64}
ROUNDS=${ROUNDS:-2}
POLICY=${POLICY:-trivial}
case $POLICY in
trivial) CHAIN=bench NATIVE_MODE=() ;;
full) CHAIN=bench_full NATIVE_MODE=(full) ;;
*) echo "POLICY is trivial or full" >&2 && exit 2 ;;
esac
mkdir -p "$OUT"
declare -A PID=()
trap 'for p in "${PID[@]}"; do kill "$p" 2>/dev/null || true; done' EXIT

sock() { # role transport
    case $2 in
    unix) echo "unix:$OUT/$1.sock" ;;
    tcp) case $1 in native) echo "inet:17100@127.0.0.1" ;; before) echo "inet:17101@127.0.0.1" ;; *) echo "inet:17102@127.0.0.1" ;; esac ;;
    esac
}

start() { # role transport
    local spec bin examples extra conf
    spec=$(sock "$1" "$2")
    if [[ $1 == native ]]; then
        "$AFTER/examples/native_baseline" "$spec" "${NATIVE_MODE[@]}" 2>>"$OUT/$1.log" &
    else
        # A directory per daemon: each keeps its own store next to its config.
        mkdir -p "$OUT/$1"
        local conf=$OUT/$1/luamilter.toml
        if [[ $1 == before ]]; then bin=$BEFORE examples=$BEFORE_EXAMPLES extra=${BEFORE_EXTRA:-}; else bin=$AFTER examples=$ROOT/examples extra=${AFTER_EXTRA:-}; fi
        sed -e "s|^listen = .*|listen = \"$spec\"|" -e "s|^dirs = .*|dirs = [\"$examples\"]|" \
            -e "s|^chain = .*|chain = [\"$CHAIN\"]|" \
            "$ROOT/benches/bench.toml" >"$conf"
        if [[ -n $extra ]]; then
            sed -i '/^\[trace\]/,$d' "$conf"
            printf "%b" "$extra" >>"$conf"
        fi
        "$bin/luamilter" run --config "$conf" 2>>"$OUT/$1.log" &
    fi
    PID[$1]=$!
    for _ in $(seq 100); do
        "$GEN" bench -s "$spec" --hold 1 --hold-secs 0 --timeout 1 >/dev/null 2>&1 && return
        kill -0 "${PID[$1]}" 2>/dev/null || { echo "$1 exited; see $OUT/$1.log" >&2; exit 1; }
        sleep 0.1
    done
    echo "$1 is not answering on $spec" >&2
    exit 1
}

for t in $TRANSPORTS; do
    for r in native before after; do start "$r" "$t"; done
    for r in native before after; do "$GEN" bench -s "$(sock "$r" "$t")" -c 8 -n 500 >/dev/null; done
    i=0
    for round in $(seq "$ROUNDS"); do
        for c in $CONC; do
            case $c in 1) n=3000 ;; 8) n=8000 ;; *) n=15000 ;; esac
            [[ -n ${QUICK:-} ]] && n=$((n / 5))
            roles=(native before after)
            k=$((i % 3))
            order=("${roles[@]:$k}" "${roles[@]:0:$k}")
            i=$((i + 1))
            echo "  $t c=$c round $round" >&2
            for r in "${order[@]}"; do
                "$GEN" bench -s "$(sock "$r" "$t")" -c "$c" -n "$n" -b 2k --server-pid "${PID[$r]}" \
                    --json >"$OUT/$t-c$c-$r-r$round.json" || echo "warning: errors in $r $t c=$c" >&2
            done
        done
    done
    for r in native before after; do kill "${PID[$r]}"; wait "${PID[$r]}" 2>/dev/null || true; unset "PID[$r]"; done
done

python3 - "$OUT" <<'PY' | tee "$OUT/summary.txt"
import glob, json, re, statistics, sys
out = sys.argv[1]
runs = {}
for path in glob.glob(out + "/*-r*.json"):
    m = re.search(r"/(\w+)-c(\d+)-(\w+)-r\d+\.json$", path)
    text = open(path).read()
    if text.strip():
        runs.setdefault((m[1], int(m[2])), {}).setdefault(m[3], []).append(json.loads(text))
print(f"{'transport':9} {'conc':>4} | {'native':>7} {'before':>7} {'after':>7} msg/s | before/nat after/nat after/before"
      f" | {'native':>7} {'before':>7} {'after':>7} msg/cpu-s | before/nat after/nat after/before")
for key in sorted(runs, key=lambda k: (k[0] != "unix", k[1])):
    med = lambda role, f: statistics.median(f(r) for r in runs[key][role])
    t = {r: med(r, lambda x: x["messages_per_sec"]) for r in ("native", "before", "after")}
    e = {r: med(r, lambda x: x["server"]["messages_per_cpu_sec"]) for r in ("native", "before", "after")}
    print(f"{key[0]:9} {key[1]:>4} | {t['native']:7.0f} {t['before']:7.0f} {t['after']:7.0f}       | "
          f"{t['before']/t['native']:10.2f} {t['after']/t['native']:9.2f} {t['after']/t['before']:12.2f} | "
          f"{e['native']:7.0f} {e['before']:7.0f} {e['after']:7.0f}           | "
          f"{e['before']/e['native']:10.2f} {e['after']/e['native']:9.2f} {e['after']/e['before']:12.2f}")
PY
