"""Deployed (TorchScript, graph engine) vs eager LES: time of energy + forces on NaCl boxes.

Variants, interleaved in one process on the same box: the base MACE alone, base + LES on
the default engine (Ewald/P3M, eager), base + LES on the graph engine (eager), and the
deployable copy compiled with ``torch.jit.script`` then saved and reloaded. Also prints
the largest force difference between the reloaded model and the eager graph engine
(should be ~1e-13) and between the graph engine and the default engine (the accuracy).

    python benchmarks/bench_torchscript.py                 # N = 64, 512, 1728
    python benchmarks/bench_torchscript.py --sizes 2 4 --repeats 5 --accuracy 1e-4
"""

import argparse
import io
import os
import time

import mace  # noqa: F401  (before e3nn)
import numpy as np
import torch
from ase.build import bulk

import mace_lr
from mace_lr import testing as T
from mace_lr._data import atoms_to_batch


def _time(model, batch, repeats: int):
    def step():
        data = {k: v.clone() if k == "positions" else v for k, v in batch.items()}
        out = model(data, compute_force=True)
        return out["forces"].detach()

    for _ in range(6):  # warm-up: TorchScript profiles the first calls, then optimises
        forces = step()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - start) / repeats, forces


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[2, 4, 6], help="cubic cells per edge (8 atoms each)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--accuracy", type=float, default=1e-3)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    base = T.make_test_model(hidden_irreps="8x0e", r_max=5.0, num_interactions=2, dtype=torch.float64)
    les = mace_lr.augment(base, "les", accuracy=args.accuracy)
    with torch.no_grad():
        les.blocks["les"].coupling.fill_(0.1)
    graph = les.deployable()
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(graph.deployable()), buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    for model in (base, les, graph):
        for p in model.parameters():
            p.requires_grad_(False)
    print(
        f"LES accuracy {args.accuracy:g}, float64, {torch.get_num_threads()} thread(s), load {os.getloadavg()}"
    )
    print(f"{'N':>6} {'base s':>9} {'LES eager s':>12} {'LES graph s':>12} {'LES scripted s':>15}  "
          f"{'|F scripted - graph|':>21} {'|F graph - default|':>20}")  # fmt: skip
    for n_cells in args.sizes:
        atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True) * (n_cells, n_cells, n_cells)
        atoms.positions += np.random.default_rng(0).normal(scale=0.1, size=atoms.positions.shape)
        batch = atoms_to_batch([atoms], [11, 17], 5.0)
        t_base, _ = _time(lambda d, **kw: base(d, **kw), batch, args.repeats)
        t_les, f_les = _time(les, batch, args.repeats)
        t_graph, f_graph = _time(graph, batch, args.repeats)
        t_script, f_script = _time(loaded, batch, args.repeats)
        d_script = float((f_script - f_graph).abs().max())
        d_engine = float((f_graph - f_les).abs().max())
        print(f"{len(atoms):>6} {t_base:>9.3f} {t_les:>12.3f} {t_graph:>12.3f} {t_script:>15.3f}  "
              f"{d_script:>21.2e} {d_engine:>20.2e}")  # fmt: skip


if __name__ == "__main__":
    main()
