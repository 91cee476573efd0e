"""Calibrate the P3M error model and cost constants used by the parameter chooser.

Sweeps the Ewald width s and the mesh spacing a on a rattled NaCl-like box with Gaussian
charges, measures the relative force error against a converged reference and the time of
the real-space and mesh parts (energy + forces), and prints err/(a/s)^p, the constant C
of the error model err ≈ C (a/s)^p used in ``mace_lr/electrostatics/_kernels.py``.

    python benchmarks/calibrate_p3m.py --cells 8
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=8, help="rocksalt cubic cells per side (8 atoms each)")
    parser.add_argument("--smearing", type=float, default=1.0)
    parser.add_argument("--accuracy", type=float, default=1e-4, help="sets the real-space cutoff")
    args = parser.parse_args()

    from ase.build import bulk

    from mace_lr.electrostatics import _engine
    from mace_lr.electrostatics._kernels import EwaldParameters

    torch.set_default_dtype(torch.float64)
    atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True) * (args.cells,) * 3
    atoms.positions += np.random.default_rng(0).normal(scale=0.2, size=atoms.positions.shape)
    pos = torch.tensor(atoms.positions, requires_grad=True)
    cell = torch.tensor(atoms.cell[:])
    q = (torch.tensor([1.0 if z == 11 else -1.0 for z in atoms.numbers]) * 0.3)[:, None]
    sigma = args.smearing

    def run(p):
        t0 = time.perf_counter()
        phi = _engine._real_space(pos, q, cell, p, sigma, (True,) * 3)
        e_r = 0.5 * (q * phi).sum()
        g_r = torch.autograd.grad(e_r, pos)[0] if p.rcut > 0 else torch.zeros_like(pos)
        t1 = time.perf_counter()
        phi_k = _engine._reciprocal_space(pos, q, cell, p, sigma)
        e_k = 0.5 * (q * phi_k).sum()
        g_k = torch.autograd.grad(e_k, pos)[0]
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, g_r + g_k

    log_ref = math.log(1e10)
    ref = EwaldParameters(
        "p3m", 2.0, 2.0 * math.sqrt(2 * (log_ref + 1)), mesh_spacing=0.12, interpolation_nodes=5
    )
    _, _, g_ref = run(ref)
    log_eps = math.log(1 / args.accuracy)
    print(f"N={len(atoms)}, σ={sigma} Å, real-space cutoff for accuracy {args.accuracy:g}")
    print(
        f"{'s':>5} {'a':>6} {'a/s':>6} {'mesh':>14} {'pairs':>9} {'t_real':>7} {'t_mesh':>7} {'relF':>8} {'C=relF/(a/s)^5':>15}"
    )
    for split in (1.2, 1.5, 2.0, 2.5):
        for ratio in (0.3, 0.4, 0.5, 0.6, 0.7):
            spacing = ratio * split
            p = EwaldParameters(
                "p3m",
                split,
                split * math.sqrt(2 * (log_eps + 1)),
                mesh_spacing=spacing,
                interpolation_nodes=5,
            )
            calc = _engine._p3m_calculator(p, pos.dtype, pos.device)
            shape = calc.mesh_shape(cell).tolist()
            if np.prod(shape) > 3e6:
                continue
            run(p)
            t_r, t_k, g = run(p)
            rel = float((g - g_ref).norm() / g_ref.norm())
            actual = float(atoms.cell.lengths()[0]) / shape[0]
            pairs = len(atoms) * len(atoms) / atoms.get_volume() * 2 / 3 * math.pi * p.rcut**3
            print(
                f"{split:5.2f} {actual:6.3f} {actual / split:6.3f} {str(shape):>14} {pairs:9.0f} {t_r:7.3f} {t_k:7.3f} {rel:8.1e} {rel / (actual / split) ** 5:15.4f}"
            )


if __name__ == "__main__":
    main()
