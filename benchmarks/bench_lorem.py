"""Cost of the `lorem` block against LES on NaCl-like boxes, measured side by side.

Energy + forces of a small MACE alone, + LES, + lorem (l_max = 1 and 2); each
(N, variant) runs in a fresh subprocess so its peak RSS is its own. The block cost is the
time of base + block minus the base time; the table gives lorem / LES ratios of that
block cost and of the total time. lorem's C·(l_max+1)² charge components go through
the engine as one multi-channel call per update.

    python benchmarks/bench_lorem.py                       # N = 4096, 32768
    python benchmarks/bench_lorem.py --sizes 4096 --repeats 3 --channels 8
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

VARIANTS = ("base", "les", "lorem_l1", "lorem_l2")


def _worker(n_cells: int, variant: str, repeats: int, dtype: str, accuracy: float, channels: int) -> dict:
    import resource

    import numpy as np
    import torch
    from ase.build import bulk

    import mace_lr
    from mace_lr import testing as T
    from mace_lr._data import atoms_to_batch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    device = os.environ.get("BENCH_DEVICE", "cpu")
    tdtype = getattr(torch, dtype)
    atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True) * (n_cells, n_cells, n_cells)
    atoms.positions += np.random.default_rng(0).normal(scale=0.1, size=atoms.positions.shape)
    base = T.make_test_model(hidden_irreps="8x0e+8x1o", r_max=4.0, num_interactions=2, dtype=tdtype)
    if variant == "base":
        model = base
    elif variant == "les":
        model = mace_lr.augment(base, "les", accuracy=accuracy)
        with torch.no_grad():
            model.blocks["les"].coupling.fill_(0.1)
    else:
        l_max = int(variant[-1])
        model = mace_lr.augment(base, "lorem", accuracy=accuracy, l_max=l_max, channels=channels)
        with torch.no_grad():
            model.blocks["lorem"].readout_out.weight.normal_(std=0.1)
    model = model.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    batch = atoms_to_batch([atoms], [11, 17], 4.0, dtype=tdtype, device=device)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def step():
        data = {k: v.clone() if k == "positions" else v for k, v in batch.items()}
        out = model(data, compute_force=True)
        value = float(out["energy"].detach()[0])
        if device != "cpu":
            torch.cuda.synchronize()
        return value

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
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 32768])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    parser.add_argument("--accuracy", type=float, default=1e-4)
    parser.add_argument("--channels", type=int, default=8)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--json", help="write the raw rows to this file")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        row = _worker(
            int(args.worker[0]), args.worker[1], args.repeats, args.dtype, args.accuracy, args.channels
        )
        print(json.dumps(row))
        return
    rows = []
    for n in args.sizes:
        n_cells = round((n / 8) ** (1 / 3))
        for variant in args.variants:
            cmd = [sys.executable, __file__, "--worker", str(n_cells), variant, "--repeats", str(args.repeats),
                   "--dtype", args.dtype, "--accuracy", str(args.accuracy), "--channels", str(args.channels)]  # fmt: skip
            res = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if res.returncode != 0:
                print(res.stderr[-3000:], file=sys.stderr)
                print(f"  N={n} {variant}: worker failed (exit {res.returncode})", file=sys.stderr)
                continue
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"  measured N={r['n_atoms']:>6} {variant:9s} {r['time_s']:.3f} s  {r['peak_rss_mb']:.0f} MB",
                  file=sys.stderr, flush=True)  # fmt: skip
    threads = os.environ.get("BENCH_THREADS", "2")
    device = os.environ.get("BENCH_DEVICE", "cpu")
    print(
        f"\nlorem vs LES, energy+forces, {args.dtype}, accuracy {args.accuracy:g}, C = {args.channels}, "
        f"{device}, {threads} threads"
    )
    print(
        f"{'N':>7} | {'variant':>9} | {'total s':>8} | {'block s':>8} | {'block/LES':>9} | {'total/LES':>9} | {'peak MB':>8}"
    )
    print("-" * 80)
    for n in sorted({r["n_atoms"] for r in rows}):
        got = {r["variant"]: r for r in rows if r["n_atoms"] == n}
        base_t = got["base"]["time_s"] if "base" in got else float("nan")
        les = got.get("les")
        les_block = les["time_s"] - base_t if les else float("nan")
        for variant in VARIANTS:
            if variant not in got:
                continue
            r = got[variant]
            block = r["time_s"] - base_t if variant != "base" else 0.0
            ratio = block / les_block if variant != "base" and les else float("nan")
            total = r["time_s"] / les["time_s"] if les else float("nan")
            print(f"{n:>7} | {variant:>9} | {r['time_s']:8.3f} | {block:8.3f} | {ratio:9.2f} | {total:9.2f} | "
                  f"{r['peak_rss_mb']:8.0f}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
