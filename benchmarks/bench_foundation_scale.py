"""Inference at foundation-model scale: base vs base+LES vs base+QEq, time and peak memory.

A MACE-MP-0-medium-sized backbone (128x0e+128x1o, r_max 6 Å, 89 elements, max_ell 3,
correlation 3, random weights: ``mace_lr.testing.make_foundation_like_model``) on
NaCl-like boxes, energy + forces + stress. Each (N, variant, dtype) runs in a fresh
subprocess, so peak RSS is that configuration's own; the table prints the ratios to the
base measured side by side in this run, and the float32-vs-float64 agreement of energies
and forces.

    python benchmarks/bench_foundation_scale.py                       # N = 512, 4096
    python benchmarks/bench_foundation_scale.py --sizes 512 4096 32768 --arch mp0-medium
    python benchmarks/bench_foundation_scale.py --sizes 512 --dtypes float64

Measured 8 Dec 2026, N = 4096 (132 408 edges), float32, 1 thread, shared 2-core machine
at load average 1.6–2.8, median of 2 (``--sizes 4096 --dtypes float32``): base 110.5 s and
12 435 MB, +LES 97.0 s (0.88×) and 12 465 MB (1.002×), +QEq 96.3 s (0.87×) and 12 562 MB
(1.010×). The time ratios below 1 are load noise (about ±15 % here): the blocks' own cost
is a fraction of a second against a 100 s base. float64 at this size needs more than the
machine's 24 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def _worker(n_cells: int, variant: str, repeats: int, dtype: str, arch: str, out_file: str) -> dict:
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
    # built in float64 and cast, so that float32 and float64 runs have the same weights
    base = T.make_foundation_like_model(arch, dtype=torch.float64)
    if variant == "base":
        model = base
    else:
        model = T.perturb_blocks(mace_lr.augment(base, variant.split("+")[1]), scale=0.3)
    model = model.to(tdtype)
    base = base.to(tdtype)
    for p in model.parameters():
        p.requires_grad_(False)
    batch = atoms_to_batch([atoms], base.atomic_numbers.tolist(), float(base.r_max), dtype=tdtype)
    rss_setup = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def step():
        data = {k: v.clone() if k == "positions" else v for k, v in batch.items()}
        return model(data, compute_force=True, compute_stress=True)

    out = step()  # warm-up (parameter choice, caches)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = step()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    np.savez(
        out_file,
        energy=out["energy"].detach().double().numpy(),
        forces=out["forces"].detach().double().numpy(),
    )
    return {
        "n_atoms": len(atoms),
        "n_edges": int(batch["edge_index"].shape[1]),
        "variant": variant,
        "dtype": dtype,
        "time_s": float(np.median(times)),
        "peak_rss_mb": peak / 1024.0,
        "setup_rss_mb": rss_setup / 1024.0,
        "out": out_file,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 4096])
    parser.add_argument("--variants", nargs="+", default=["base", "base+les", "base+qeq"])
    parser.add_argument("--dtypes", nargs="+", default=["float64", "float32"])
    parser.add_argument("--arch", default="mp0-medium")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--keep", help="directory for the per-run outputs (default: a new temporary one)")
    parser.add_argument("--json", help="write the raw rows to this file")
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        n_cells, variant, dtype, arch, out_file = args.worker
        print(json.dumps(_worker(int(n_cells), variant, args.repeats, dtype, arch, out_file)))
        return
    import numpy as np

    tmp = args.keep or tempfile.mkdtemp(prefix="bench_foundation_")
    rows = []
    for n in args.sizes:
        n_cells = round((n / 8) ** (1 / 3))
        for dtype in args.dtypes:
            for variant in args.variants:
                out_file = os.path.join(tmp, f"{n}_{variant}_{dtype}.npz")
                cmd = [sys.executable, __file__, "--repeats", str(args.repeats), "--worker"]
                cmd += [str(n_cells), variant, dtype, args.arch, out_file]
                res = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if res.returncode != 0:
                    print(res.stderr[-3000:], file=sys.stderr)
                    print(
                        f"  worker failed for N={n} {variant} {dtype} (rc {res.returncode})", file=sys.stderr
                    )
                    continue
                rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
                r = rows[-1]
                print(
                    f"  measured N={r['n_atoms']:>6} {variant:9s} {dtype} {r['time_s']:.3f} s {r['peak_rss_mb']:.0f} MB",
                    file=sys.stderr,
                    flush=True,
                )
    threads = os.environ.get("BENCH_THREADS", "2")
    print(
        f"\n{args.arch} backbone, energy+forces+stress, NaCl box, {threads} threads, median of {args.repeats}"
    )
    head = f"{'N':>6} {'edges':>8} {'dtype':>8} {'variant':>9} | {'time s':>8} {'x base':>7} | {'peak MB':>8} {'x base':>7}"
    print(head + f" | {'max|dE| f32-f64 eV':>19} {'max|dF| eV/A':>12}")
    print("-" * (len(head) + 36))
    for r in rows:
        b = next(
            (
                x
                for x in rows
                if x["n_atoms"] == r["n_atoms"] and x["dtype"] == r["dtype"] and x["variant"] == "base"
            ),
            None,
        )
        ratio_t = f"{r['time_s'] / b['time_s']:7.3f}" if b else "      -"
        ratio_m = f"{r['peak_rss_mb'] / b['peak_rss_mb']:7.3f}" if b else "      -"
        agree = ""
        if r["dtype"] == "float32":
            ref = next(
                (
                    x
                    for x in rows
                    if x["n_atoms"] == r["n_atoms"]
                    and x["dtype"] == "float64"
                    and x["variant"] == r["variant"]
                ),
                None,
            )
            if ref:
                a32, a64 = np.load(r["out"]), np.load(ref["out"])
                de = float(np.abs(a32["energy"] - a64["energy"]).max())
                df = float(np.abs(a32["forces"] - a64["forces"]).max())
                agree = f" | {de:19.3g} {df:12.3g}"
        print(
            f"{r['n_atoms']:>6} {r['n_edges']:>8} {r['dtype']:>8} {r['variant']:>9} | {r['time_s']:8.3f} {ratio_t} | "
            f"{r['peak_rss_mb']:8.0f} {ratio_m}{agree}"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
