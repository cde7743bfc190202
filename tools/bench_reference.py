#!/usr/bin/env python3
"""LightGBM's own Booster.predict (one thread) on the same model and rows as
benches/tree_eval.rs, for batches of 1, 100 and 10,000 rows; each call takes
the next batch from the same pool of 10,000 distinct rows. Prints rows/s
as JSON lines: {"impl": "lightgbm-python", "batch": N, "rows_per_s": X, "us_per_row": Y}.
"""
import json
import math
import sys
import time
from pathlib import Path

import lightgbm as lgb
import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def rows(n, nf):
    """The same xorshift stream as benches/tree_eval.rs."""
    state = 0x9E3779B97F4A7C15
    mask = (1 << 64) - 1

    def nxt():
        nonlocal state
        state ^= (state << 13) & mask
        state ^= state >> 7
        state ^= (state << 17) & mask
        return (state >> 11) / float(1 << 53)

    out = np.empty(n * nf)
    for i in range(n * nf):
        out[i] = math.nan if nxt() < 0.05 else (nxt() - 0.5) * 0.2
    return out.reshape(n, nf)


def main():
    model = ROOT / "models" / "diabetes_lgbm.txt"
    booster = lgb.Booster(model_file=str(model), params={"num_threads": 1})
    nf = booster.num_feature()
    budget = float(sys.argv[1]) if len(sys.argv) > 1 else 3.0
    pool = rows(10_000, nf)
    for batch in (1, 100, 10_000):
        batches = [np.ascontiguousarray(pool[i:i + batch]) for i in range(0, len(pool) - batch + 1, batch)]
        booster.predict(batches[0], num_threads=1)  # warm-up
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < budget:
            booster.predict(batches[n % len(batches)], num_threads=1)
            n += 1
        secs = time.perf_counter() - start
        rps = n * batch / secs
        print(json.dumps({"impl": "lightgbm-python", "batch": batch, "trees": booster.num_trees(),
                          "rows_per_s": rps, "us_per_row": 1e6 / rps}), flush=True)


if __name__ == "__main__":
    main()
