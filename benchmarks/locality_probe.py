"""Locality probe: ‖∂q_i/∂R_k‖ against distance for LES (local) and QEq (nonlocal).

A Na/Cl chain of 24 atoms spaced 2.8 Å (64 Å long) and a small MACE (r_max 4 Å,
2 interactions: receptive field 8 Å) with each block attached and its parameters moved
off their initial values. Prints the largest response beyond the receptive field for each
block and writes ``benchmarks/results/locality_probe.png``.

    python benchmarks/locality_probe.py
"""

from __future__ import annotations

from pathlib import Path

import mace  # noqa: F401
import numpy as np
from ase import Atoms

from mace_lr import augment
from mace_lr.analysis import locality_probe, plot_locality
from mace_lr.testing import make_test_model, perturb_blocks

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    n, spacing, r_max, interactions = 24, 2.8, 4.0, 2
    atoms = Atoms(
        numbers=[11 if i % 2 == 0 else 17 for i in range(n)],
        positions=[[i * spacing, 0.1 * (i % 3), 0.0] for i in range(n)],
    )
    atoms.info["charge"] = 0.0
    base = make_test_model(r_max=r_max, num_interactions=interactions)
    receptive = interactions * r_max
    probes = {}
    print("| block | max ‖∂q_i/∂R_k‖ within 8 Å (e/Å) | max beyond 8 Å | min beyond 8 Å | at 60 Å |")
    print("|---|---|---|---|---|")
    for name in ("les", "qeq"):
        model = perturb_blocks(augment(base, name))
        probe = locality_probe(model, atoms, atoms_indices=[0, 1, 2])
        probes[name] = probe
        d, r = probe["distance"], probe["response"]
        near, far = (d > 0) & (d <= receptive), d > receptive + 0.5
        at60 = r[np.abs(d - 60.0) < 2.0]
        print(
            f"| {name} | {r[near].max():.3g} | {r[far].max():.3g} | {r[far].min():.3g} | "
            f"{at60.max() if at60.size else float('nan'):.3g} |"
        )
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "locality_probe.png"
    plot_locality(probes, path, cutoff=receptive)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
