#!/usr/bin/env bash
# Native evaluators vs the reference libraries, one thread, same model and
# rows, in one run:
#   - the native LightGBM evaluator vs LightGBM's Booster.predict
#     (models/diabetes_lgbm.txt; batches of 1, 100, 10,000);
#   - the torch backend (tch/libtorch) vs Python torch on the shipped MLP
#     (models/wine_mlp.pt; batches of 1 and 1,000).
# Prints rows/s and the ratios.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
bash scripts/setup-python.sh
bash scripts/fetch-libtorch.sh
out="$root/target/bench-models"
mkdir -p "$out"
cargo bench --bench tree_eval -- --noplot --output-format bencher 2>/dev/null | tee "$out/native.txt"
.cache/venv/bin/python tools/bench_reference.py | tee "$out/python.jsonl"
cargo bench --features torch --bench torch_mlp -- --noplot --output-format bencher 2>/dev/null | tee "$out/torch-native.txt"
.cache/venv/bin/python tools/bench_torch.py | tee "$out/torch-python.jsonl"
python3 - "$out" <<'PY'
import json, re, sys, os
out = sys.argv[1]
def native(f, label="native"):
    r = {}
    for line in open(os.path.join(out, f)):
        m = re.match(r"test \S+/" + label + r"/(\d+)\s+\.\.\. bench:\s+([\d,]+) ns/iter", line)
        if m:
            batch, ns = int(m.group(1)), int(m.group(2).replace(",", ""))
            r[batch] = batch / (ns * 1e-9)
    return r
def python(f):
    return {r["batch"]: r["rows_per_s"] for r in map(json.loads, open(os.path.join(out, f)))}
for title, nat, py, ref in [("LightGBM, 150 trees (models/diabetes_lgbm.txt)", "native.txt", "python.jsonl", "lightgbm"),
                            ("PyTorch MLP 13-32-16-3 (models/wine_mlp.pt)", "torch-native.txt", "torch-python.jsonl", "torch")]:
    n, p = native(nat), python(py)
    print(f"\n{title}\n{'batch':>6} {'ml-worker rows/s':>17} {ref + ' rows/s':>16} {'ratio':>7} {'ml-worker us/row':>17}")
    for b in sorted(n):
        print(f"{b:>6} {n[b]:>17,.0f} {p.get(b, float('nan')):>16,.0f} {n[b] / p.get(b, float('nan')):>6.1f}x {1e6 / n[b]:>17.3f}")
    served = native(nat, "served")
    if served:
        print("the same model as the registry serves it (its loader, ServedModel's checks):")
        for b in sorted(served):
            print(f"{b:>6} {served[b]:>17,.0f} rows/s served; the boundary costs {1e6 / served[b] - 1e6 / n[b]:,.3f} us/row ({n[b] / served[b]:.2f}x)")
    local = native(nat, "in-process")
    if local:
        print("torch models run in a process of their own; the same model in the worker's process:")
        for b in sorted(local):
            print(f"{b:>6} {local[b]:>17,.0f} rows/s in process; the process boundary costs {1e6 / n[b] - 1e6 / local[b]:,.3f} us/row ({local[b] / n[b]:.2f}x)")
PY
