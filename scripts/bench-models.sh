#!/usr/bin/env bash
# Native LightGBM evaluator vs LightGBM's own Booster.predict, one thread,
# same model (models/diabetes_lgbm.txt) and rows, in one run. Prints rows/s
# for batches of 1, 100, 10,000 and the ratio.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
bash scripts/setup-python.sh
out="$root/target/bench-models"
mkdir -p "$out"
cargo bench --bench tree_eval -- --noplot --output-format bencher 2>/dev/null | tee "$out/native.txt"
.cache/venv/bin/python tools/bench_reference.py | tee "$out/python.jsonl"
python3 - "$out/native.txt" "$out/python.jsonl" <<'PY'
import json, re, sys
native = {}
for line in open(sys.argv[1]):
    m = re.match(r"test \S+/native/(\d+)\s+\.\.\. bench:\s+([\d,]+) ns/iter", line)
    if m:
        batch, ns = int(m.group(1)), int(m.group(2).replace(",", ""))
        native[batch] = batch / (ns * 1e-9)
py = {r["batch"]: r["rows_per_s"] for r in map(json.loads, open(sys.argv[2]))}
print(f"\n{'batch':>6} {'native rows/s':>15} {'lightgbm rows/s':>16} {'ratio':>7} {'native us/row':>14}")
for b in sorted(native):
    print(f"{b:>6} {native[b]:>15,.0f} {py.get(b, float('nan')):>16,.0f} {native[b] / py.get(b, float('nan')):>6.1f}x {1e6 / native[b]:>14.3f}")
PY
