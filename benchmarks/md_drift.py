"""NVE energy drift of MACE + a long-range block through the ASE calculator (periodic, open, slab).

A small random-initialised MACE with an LES block whose charges are switched on
(``mace_lr.testing.perturb_blocks``), or a wannier block (Na +1; Cl +7 with an 8-electron
centroid; plain Coulomb coupling), drives velocity-Verlet MD of rattled NaCl at 600 K.
Prints the drift (linear fit of the total energy, eV/atom/ps) and the largest excursion.
``--truncation plain`` swaps the engine's shifted-force real-space cutoff for plain
truncation (energy jumps when a pair crosses r_c) to compare the two in one run.

    python benchmarks/md_drift.py --steps 500
    python benchmarks/md_drift.py --block wannier --cells periodic --truncation shifted plain
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def run(kind: str, steps: int, dt_fs: float, seed: int, scale: float, block: str, truncation: str) -> dict:
    import torch
    from ase import units
    from ase.build import bulk
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary
    from ase.md.verlet import VelocityVerlet

    import mace_lr
    from mace_lr import testing as T
    from mace_lr.electrostatics import _engine, _kernels

    torch.manual_seed(seed)
    if block == "les":
        model = T.perturb_blocks(mace_lr.augment(T.make_test_model(), "les", accuracy=1e-5), scale=scale)
    else:  # default accuracy 1e-3, coupling 1 after perturb_blocks' +scale
        config = {"centroid_electrons": {"Cl": 8}, "coupling_init": 1.0 - scale}
        model = T.perturb_blocks(mace_lr.augment(T.make_test_model(), {"wannier": config}), scale=scale)

    def plain(r, smearing, split, rcut):
        v = _kernels.short_range_kernel(r, smearing, split)
        return torch.where(r < rcut, v, torch.zeros_like(v))

    _engine.truncated_short_range_kernel = (
        plain if truncation == "plain" else _kernels.truncated_short_range_kernel
    )
    atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True) * (2, 2, 2)
    if kind == "open":
        atoms.pbc = False
        atoms.cell = [0, 0, 0]
    elif kind == "slab":
        atoms.cell[2] = [0, 0, 30.0]
        atoms.pbc = [True, True, False]
    atoms.positions += np.random.default_rng(seed).normal(scale=0.05, size=atoms.positions.shape)
    atoms.calc = mace_lr.MACELRCalculator(model_paths=model, device="cpu")
    MaxwellBoltzmannDistribution(atoms, temperature_K=600, rng=np.random.default_rng(seed))
    Stationary(atoms)
    dyn = VelocityVerlet(atoms, timestep=dt_fs * units.fs)
    energies = []
    dyn.attach(lambda: energies.append(atoms.get_total_energy()), interval=1)
    t0 = time.perf_counter()
    dyn.run(steps)
    wall = time.perf_counter() - t0
    e = np.array(energies) / len(atoms)
    t_ps = np.arange(len(e)) * dt_fs / 1000.0
    slope = np.polyfit(t_ps, e, 1)[0]
    return {
        "kind": f"{kind}/{truncation}",
        "atoms": len(atoms),
        "steps": steps,
        "drift": slope,
        "excursion": float(np.max(np.abs(e - e[0]))),
        "lr_share": float(atoms.calc.results["lr_energy"]) / len(atoms),
        "wall": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--dt", type=float, default=1.0, help="time step, fs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--perturbation", type=float, default=0.1, help="size of the random block weights")
    parser.add_argument(
        "--cells", nargs="+", default=["periodic", "open", "slab"], choices=["periodic", "open", "slab"]
    )
    parser.add_argument("--block", default="les", choices=["les", "wannier"])
    parser.add_argument(
        "--truncation",
        nargs="+",
        default=["shifted"],
        choices=["shifted", "plain"],
        help="real-space cutoff of the periodic sums: shifted force (the engine's) or plain",
    )
    args = parser.parse_args()
    rows = [
        run(kind, args.steps, args.dt, args.seed, args.perturbation, args.block, trunc)
        for kind in args.cells
        for trunc in args.truncation
    ]
    print(f"NVE, {args.dt} fs, 600 K, MACE + {args.block} (perturbation {args.perturbation}), float64")
    print(
        f"{'cell':<18} {'N':>4} {'steps':>6} {'drift eV/atom/ps':>17} {'max |ΔE| eV/atom':>17} {'E_LR eV/atom':>13} {'wall s':>7}"
    )
    for r in rows:
        print(
            f"{r['kind']:<18} {r['atoms']:>4} {r['steps']:>6} {r['drift']:17.2e} {r['excursion']:17.2e} {r['lr_share']:13.4f} {r['wall']:7.1f}"
        )


if __name__ == "__main__":
    main()
