#!/usr/bin/env bash
# The Python reference libraries (for fixtures and benchmarks) in a venv at
# .cache/venv. Idempotent: reinstalls only when tools/requirements.txt changes.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/.cache/venv"
req="$root/tools/requirements.txt"
stamp="$venv/.requirements.sha256"
want=$(sha256sum "$req" | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --upgrade pip
"$venv/bin/pip" install --quiet -r "$req"
echo "$want" > "$stamp"
