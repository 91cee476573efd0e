"""QEq block cost vs N: dense and CG solvers against the LES block on the same periodic box.

Times one energy + forces evaluation of the block alone (fixed random invariant features
standing in for the base model's, NaCl-like rattled box, float64), each configuration in
a fresh subprocess. CG runs cold (first call) and warm (the next MD-like step, started
from the previous charges), to the block's tolerance (default 1e-6 relative residual).
Prints a table with CG iterations, the QEq/LES time ratio and the CG cost per
(N ln N × iteration), and saves a log-log plot.

    python benchmarks/bench_qeq.py                         # N = 512 ... 32768
    python benchmarks/bench_qeq.py --sizes 512 4096 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _worker(n_cells: int, variant: str, repeats: int, accuracy: float, tol: float) -> dict:
    import mace  # noqa: F401
    import numpy as np
    import torch
    from ase.build import bulk

    from mace_lr import get_block

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    torch.set_default_dtype(torch.float64)
    atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True) * (n_cells, n_cells, n_cells)
    rng = np.random.default_rng(0)
    atoms.positions += rng.normal(scale=0.1, size=atoms.positions.shape)
    n = len(atoms)
    kwargs = {"feature_irreps": "8x0e", "atomic_numbers": [11, 17], "r_max": 4.0}
    if variant == "les":
        block = get_block("les")(**kwargs, accuracy=accuracy)
    else:
        solver = "dense" if variant == "qeq-dense" else "cg"
        block = get_block("qeq")(**kwargs, accuracy=accuracy, solver=solver, tol=tol)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
        block.coupling.fill_(0.5)
    block.eval()
    species = torch.tensor([0 if z == 11 else 1 for z in atoms.numbers])
    feats = torch.randn(n, 8, generator=gen) * 0.3 + species[:, None].double()

    def ctx_for(positions):
        return {
            "positions": positions,
            "cell": torch.tensor(np.asarray(atoms.cell))[None],
            "pbc": torch.ones(1, 3, dtype=torch.bool),
            "batch": torch.zeros(n, dtype=torch.int64),
            "ptr": torch.tensor([0, n]),
            "atomic_numbers": torch.tensor(atoms.numbers),
            "node_attrs": torch.nn.functional.one_hot(species, 2).double(),
            "node_feats": feats,
            "total_charge": torch.zeros(1),
            "external_field": torch.zeros(1, 3),
            "edge_index": torch.zeros(2, 0, dtype=torch.int64),
            "shifts": torch.zeros(0, 3),
            "electrode": torch.zeros(n, dtype=torch.int64),
            "electrode_potential": torch.zeros(1),
        }

    base_positions = torch.tensor(atoms.positions)

    def step(k: int):
        # a slightly different geometry each call, like consecutive MD steps (~0.01 Å)
        noise = torch.randn(base_positions.shape, generator=torch.Generator().manual_seed(100 + k))
        positions = (base_positions + 0.01 * k * noise / math.sqrt(k + 1)).requires_grad_(True)
        out = block(ctx_for(positions))
        (forces,) = torch.autograd.grad(out["energy"].sum(), positions)
        return float(out["energy"][0]), list(getattr(block, "last_iterations", []))

    t0 = time.perf_counter()
    _, iters_cold = step(0)  # cold: parameters chosen, CG from scratch
    cold = time.perf_counter() - t0
    times, iters = [], []
    for k in range(1, repeats + 1):
        t0 = time.perf_counter()
        _, it = step(k)
        times.append(time.perf_counter() - t0)
        iters.extend(it)
    return {
        "n": n,
        "variant": variant,
        "cold_s": cold,
        "warm_s": float(np.median(times)),
        "iters_cold": iters_cold[0] if iters_cold else 0,
        "iters_warm": float(np.mean(iters)) if iters else 0.0,
    }


def _run(n_cells: int, variant: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", str(n_cells), variant, "--repeats", str(args.repeats)]
    cmd += ["--accuracy", str(args.accuracy), "--tol", str(args.tol)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        why = f"exit {proc.returncode}" + (" (killed: out of memory?)" if proc.returncode < 0 else "")
        return {"n": 8 * n_cells**3, "variant": variant, "error": f"{why}: {lines[-1] if lines else ''}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 4096, 32768])
    parser.add_argument(
        "--dense-max", type=int, default=512, help="largest N for the dense solver (N=4096 needs > 24 GB)"
    )
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--accuracy", type=float, default=1e-4, help="electrostatics accuracy (both blocks)")
    parser.add_argument("--tol", type=float, default=1e-6, help="CG relative residual")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(int(args.worker[0]), args.worker[1], args.repeats, args.accuracy, args.tol)))
        return
    rows = []
    for n in args.sizes:
        cells = round((n / 8) ** (1 / 3))
        for variant in ("les", "qeq-cg", "qeq-dense"):
            if variant == "qeq-dense" and n > args.dense_max:
                continue
            row = _run(cells, variant, args)
            rows.append(row)
            print(f"  done N={row['n']} {variant}: {row}", flush=True)
    print(
        f"\naccuracy {args.accuracy:g}, CG tol {args.tol:g}, threads {os.environ.get('BENCH_THREADS', '2')}"
    )
    print(
        "| N | block | first call s | next call s | CG iters (first / next) | × LES (next) | "
        "CG s per N ln N × iter ×1e9 |"
    )
    print("|---|---|---|---|---|---|---|")
    les = {r["n"]: r for r in rows if r["variant"] == "les" and "error" not in r}
    for r in rows:
        if "error" in r:
            print(f"| {r['n']} | {r['variant']} | failed: {r['error']} |||||")
            continue
        ratio = r["warm_s"] / les[r["n"]]["warm_s"] if r["n"] in les else float("nan")
        per = ""
        if r["variant"] == "qeq-cg" and r["iters_warm"] > 0:
            per = f"{1e9 * r['warm_s'] / (r['n'] * math.log(r['n']) * r['iters_warm']):.1f}"
        iters = f"{r['iters_cold']} / {r['iters_warm']:.1f}" if r["variant"] == "qeq-cg" else "–"
        print(
            f"| {r['n']} | {r['variant']} | {r['cold_s']:.3f} | {r['warm_s']:.3f} | {iters} | {ratio:.2f} | {per} |"
        )
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        RESULTS.mkdir(exist_ok=True)
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for variant, marker in (("les", "o-"), ("qeq-cg", "s-"), ("qeq-dense", "^-")):
            pts = sorted((r["n"], r["warm_s"]) for r in rows if r["variant"] == variant and "error" not in r)
            if pts:
                ax.loglog(*zip(*pts), marker, label=variant)
        ax.set_xlabel("atoms N")
        ax.set_ylabel("energy + forces of the block (s)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(RESULTS / "bench_qeq.png", dpi=120)
        print(f"plot: {RESULTS / 'bench_qeq.png'}")
    except ImportError:
        pass


if __name__ == "__main__":
    main()
