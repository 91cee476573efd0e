"""Time and peak memory of a small MACE vs the same MACE + LES on NaCl-like boxes.

Each (N, variant) runs in a fresh subprocess so peak RSS is that configuration's own.
Prints a table with the ratios measured side by side in this run, and how the LES part
(time of base+LES minus base) scales compared with N log N.

    python benchmarks/bench_les_overhead.py                 # N = 512, 4096, 32768
    python benchmarks/bench_les_overhead.py --sizes 512 4096 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time


def _worker(n_cells: int, variant: str, repeats: int, dtype: str, accuracy: float) -> dict:
    import resource

    import numpy as np
    import torch
    from ase.build import bulk

    import mace_lr
    from mace_lr import testing as T
    from mace_lr._data import atoms_to_batch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    tdtype = getattr(torch, dtype)
    atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True) * (n_cells, n_cells, n_cells)
    atoms.positions += np.random.default_rng(0).normal(scale=0.1, size=atoms.positions.shape)
    base = T.make_test_model(hidden_irreps="8x0e", r_max=4.0, num_interactions=2, dtype=tdtype)
    model = base if variant == "base" else mace_lr.augment(base, "les", accuracy=accuracy)
    if variant != "base":
        with torch.no_grad():
            model.blocks["les"].coupling.fill_(0.1)
    for p in model.parameters():
        p.requires_grad_(False)
    batch = atoms_to_batch([atoms], [11, 17], 4.0, dtype=tdtype)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def step():
        data = {k: v.clone() if k == "positions" else v for k, v in batch.items()}
        if variant == "base":
            out = model(data, compute_force=True)
        else:
            out = model(data, compute_force=True)
        return float(out["energy"].detach()[0])

    step()  # warm-up (parameter choice, caches)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "n_atoms": len(atoms),
        "variant": variant,
        "time_s": float(np.median(times)),
        "peak_rss_mb": peak / 1024.0,
        "rss_after_setup_mb": rss_before / 1024.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 4096, 32768])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    parser.add_argument("--accuracy", type=float, default=1e-4)
    parser.add_argument("--json", help="write the raw rows to this file")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(
            json.dumps(_worker(int(args.worker[0]), args.worker[1], args.repeats, args.dtype, args.accuracy))
        )
        return
    rows = []
    for n in args.sizes:
        n_cells = round((n / 8) ** (1 / 3))
        for variant in ("base", "base+les"):
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                str(n_cells),
                variant,
                "--repeats",
                str(args.repeats),
                "--dtype",
                args.dtype,
                "--accuracy",
                str(args.accuracy),
            ]
            res = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if res.returncode != 0:
                print(res.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"worker failed for N={n} {variant}")
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(
                f"  measured N={rows[-1]['n_atoms']:>6} {variant:9s} {rows[-1]['time_s']:.3f} s  {rows[-1]['peak_rss_mb']:.0f} MB",
                file=sys.stderr,
                flush=True,
            )
    print(
        f"\nLES overhead, energy+forces, {args.dtype}, accuracy {args.accuracy:g}, {os.environ.get('BENCH_THREADS', '2')} threads"
    )
    print(
        f"{'N':>7} | {'base s':>8} | {'+LES s':>8} | {'time +%':>7} | {'base MB':>8} | {'+LES MB':>8} | {'mem +%':>7} | {'LES s':>7} | {'LES s/(N lnN) ×1e6':>18}"
    )
    print("-" * 100)
    for n in sorted({r["n_atoms"] for r in rows}):
        b = next(r for r in rows if r["n_atoms"] == n and r["variant"] == "base")
        lr = next(r for r in rows if r["n_atoms"] == n and r["variant"] == "base+les")
        extra = lr["time_s"] - b["time_s"]
        print(
            f"{n:>7} | {b['time_s']:8.3f} | {lr['time_s']:8.3f} | {100 * extra / b['time_s']:7.1f} | "
            f"{b['peak_rss_mb']:8.0f} | {lr['peak_rss_mb']:8.0f} | {100 * (lr['peak_rss_mb'] / b['peak_rss_mb'] - 1):7.1f} | "
            f"{extra:7.3f} | {1e6 * extra / (n * math.log(n)):18.3f}"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
