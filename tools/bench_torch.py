#!/usr/bin/env python3
"""Python torch on the shipped MLP (models/wine_mlp.pt), the counterpart of
benches/torch_mlp.rs: same model, same rows (the same xorshift stream), one
intra-op thread, batches of 1 and 1,000. Each call does what the worker
does: float64 rows to a float32 tensor, forward under no_grad, softmax,
probabilities and class back to numpy. Prints JSON lines:
{"impl": "torch-python", "batch": N, "rows_per_s": X, "us_per_row": Y}.
"""
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent


def rows(n, nf):
    state = 0x9E3779B97F4A7C15
    mask = (1 << 64) - 1
    out = np.empty(n * nf)
    for i in range(n * nf):
        state ^= (state << 13) & mask
        state ^= state >> 7
        state ^= (state << 17) & mask
        out[i] = ((state >> 11) / float(1 << 53) - 0.5) * 0.2
    return out.reshape(n, nf)


def main():
    torch.set_num_threads(1)
    module = torch.jit.load(str(ROOT / "models" / "wine_mlp.pt")).eval()
    budget = float(sys.argv[1]) if len(sys.argv) > 1 else 3.0
    pool = rows(10_000, 13)

    def predict(x):
        with torch.no_grad():
            probs = torch.softmax(module(torch.from_numpy(x).to(torch.float32)), dim=1).numpy()
        return probs.argmax(1), probs.astype(np.float64)

    for batch in (1, 1000):
        batches = [np.ascontiguousarray(pool[i:i + batch]) for i in range(0, len(pool) - batch + 1, batch)]
        predict(batches[0])  # warm-up
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < budget:
            predict(batches[n % len(batches)])
            n += 1
        secs = time.perf_counter() - start
        rps = n * batch / secs
        print(json.dumps({"impl": "torch-python", "batch": batch, "rows_per_s": rps, "us_per_row": 1e6 / rps}),
              flush=True)


if __name__ == "__main__":
    main()
