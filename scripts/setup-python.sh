#!/usr/bin/env bash
# A Python venv from a requirements file, reinstalled only when the file
# changes. Default: the reference libraries (fixtures, benchmarks) in
# .cache/venv. `setup-python.sh kafka`: confluent-kafka + fastavro for the
# interoperability tests, in .cache/venv-kafka.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
case "${1:-}" in
  kafka) venv="$root/.cache/venv-kafka"; req="$root/tools/requirements-kafka.txt" ;;
  "") venv="$root/.cache/venv"; req="$root/tools/requirements.txt" ;;
  *) echo "usage: $0 [kafka]" >&2; exit 2 ;;
esac
stamp="$venv/.requirements.sha256"
# a venv is not relocatable: its scripts name its path, so the stamp does too
want="$(sha256sum "$req" | cut -d' ' -f1) $venv"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$venv/bin/python" -c '' 2>/dev/null; then
  exit 0
fi
rm -rf "$venv"
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --upgrade pip
"$venv/bin/pip" install --quiet -r "$req"
echo "$want" > "$stamp"
