"""Per-graph engine loop (before) vs one batched engine call (after) on 32 small molecules.

The molecules are the first 32 structures of ``data/dimers_train.xyz`` (3-34 atoms,
open boundaries). Rows, each energy + gradient (forward and backward), median of repeats,
measured side by side in this run:

* engine: ``coulomb_potential`` per graph vs ``coulomb_potential_batch`` (LES, wannier);
* QEq: ``solve_qeq`` per graph (dense) vs ``solve_qeq_open_batch``;
* model: base + LES, energy and forces, with the block's engine call replaced by the
  per-graph loop (before) or the batched call (after); the base alone for reference.

    python benchmarks/bench_batched_electrostatics.py [--repeats 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def _median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n_graphs", type=int, default=32)
    args = parser.parse_args()

    import ase.io
    import torch

    torch.set_num_threads(args.threads)
    import mace_lr
    from mace_lr import electrostatics as es
    from mace_lr import testing as T
    from mace_lr._data import atoms_to_batch

    here = os.path.dirname(os.path.abspath(__file__))
    atoms = ase.io.read(os.path.join(here, "..", "data", "dimers_train.xyz"), f":{args.n_graphs}")
    dtype = torch.float64
    counts = [len(a) for a in atoms]
    pos = torch.tensor([p for a in atoms for p in a.get_positions().tolist()], dtype=dtype)
    n = pos.shape[0]
    ptr = torch.tensor([0] + torch.cumsum(torch.tensor(counts), 0).tolist())
    cell = torch.zeros(len(atoms), 3, 3, dtype=dtype)
    pbc = torch.zeros(len(atoms), 3, dtype=torch.bool)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(n, generator=gen, dtype=dtype)

    def per_graph_potential(positions, charges, cell, pbc, ptr, smearing=None, accuracy=1e-6, method="auto"):
        b = ptr.tolist()
        return torch.cat(
            [
                es.coulomb_potential(
                    positions[a:c], charges[a:c], cell[g], pbc[g].tolist(), smearing, accuracy
                )
                for g, (a, c) in enumerate(zip(b[:-1], b[1:]))
            ]
        )

    def engine(fn):
        def run():
            x = pos.clone().requires_grad_(True)
            e = 0.5 * (q * fn(x, q, cell, pbc, ptr, 1.0)).sum()
            e.backward()

        return run

    chi = torch.randn(n, generator=gen, dtype=dtype)
    hardness = 5.0 + torch.rand(n, generator=gen, dtype=dtype)
    widths = 0.8 + 0.2 * torch.rand(n, generator=gen, dtype=dtype)
    total = torch.zeros(len(atoms), dtype=dtype)

    def qeq_loop():
        x = pos.clone().requires_grad_(True)
        b = ptr.tolist()
        e = sum(
            es.solve_qeq(
                x[a:c], chi[a:c], hardness[a:c], widths[a:c], None, (False,) * 3, 0.0, solver="dense"
            )["energy"]
            for a, c in zip(b[:-1], b[1:])
        )
        e.backward()

    def qeq_batch():
        x = pos.clone().requires_grad_(True)
        es.solve_qeq_open_batch(x, chi, hardness, widths, ptr, total)["energy"].sum().backward()

    base = T.make_foundation_like_model("off23-small", dtype=dtype)
    model = T.perturb_blocks(mace_lr.augment(base, "les"))
    batch = atoms_to_batch(atoms, model.atomic_numbers, float(model.r_max), dtype=dtype)
    les_module = __import__(type(model.blocks["les"]).__module__, fromlist=["x"])

    def model_run(fn):
        def run():
            les_module.coulomb_potential_batch = fn
            model(dict(batch))
            les_module.coulomb_potential_batch = es.coulomb_potential_batch

        return run

    def base_run():
        b = dict(batch)
        b["positions"] = b["positions"].clone().requires_grad_(True)
        base(b, compute_force=True)

    rows = [
        ("engine (LES/wannier), E + dE/dR", engine(per_graph_potential), engine(es.coulomb_potential_batch)),
        ("QEq dense solve, E + dE/dR", qeq_loop, qeq_batch),
        (
            "base+LES model (OFF23-small), E + F",
            model_run(per_graph_potential),
            model_run(es.coulomb_potential_batch),
        ),
    ]
    print(f"{len(atoms)} molecules, {n} atoms, float64, {args.threads} threads, median of {args.repeats}")
    print(f"{'':40s} {'per-graph loop':>15s} {'batched':>10s} {'speed-up':>9s}")
    for name, before, after in rows:
        t0 = _median_time(before, args.repeats)
        t1 = _median_time(after, args.repeats)
        print(f"{name:40s} {t0 * 1e3:12.2f} ms {t1 * 1e3:7.2f} ms {t0 / t1:8.1f}x")
    tb = _median_time(base_run, args.repeats)
    print(f"{'base alone (OFF23-small), E + F':40s} {tb * 1e3:12.2f} ms")


if __name__ == "__main__":
    main()
