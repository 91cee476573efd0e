"""Shared reference systems for the tests (Madelung crystals, random boxes)."""

from __future__ import annotations

import numpy as np
import torch
from ase import Atoms
from ase.build import bulk

#: name → (builder, Madelung constant per ion pair referenced to the nearest-neighbour
#: distance). Wurtzite is the ideal structure (c/a = √(8/3), u = 3/8).
MADELUNG = {
    "NaCl": (lambda: bulk("NaCl", "rocksalt", a=5.64, cubic=True), 1.7475645946),
    "CsCl": (lambda: bulk("CsCl", "cesiumchloride", a=4.12), 1.7626747731),
    "zincblende": (lambda: bulk("ZnS", "zincblende", a=5.41, cubic=True), 1.6380550533),
    "wurtzite": (lambda: bulk("ZnO", "wurtzite", a=3.0, c=3.0 * np.sqrt(8.0 / 3.0), u=0.375), 1.6413216),
}

CATIONS = {11, 55, 30}


def madelung_system(name: str):
    """Atoms, unit charges (+1 cation, -1 anion) and nearest-neighbour distance."""
    builder, constant = MADELUNG[name]
    atoms = builder()
    charges = torch.tensor([1.0 if z in CATIONS else -1.0 for z in atoms.numbers], dtype=torch.float64)
    d = atoms.get_all_distances(mic=True)
    nn = float(d[d > 1e-8].min())
    return atoms, charges, nn, constant


def random_box(n: int, density: float = 0.05, seed: int = 0, neutral: bool = True, triclinic: bool = False):
    """Random positions and charges in a (possibly triclinic) periodic box."""
    rng = np.random.default_rng(seed)
    length = (n / density) ** (1.0 / 3.0)
    cell = np.eye(3) * length
    if triclinic:
        cell = np.array(
            [
                [length, 0.0, 0.0],
                [0.3 * length, 0.9 * length, 0.0],
                [-0.2 * length, 0.25 * length, 1.1 * length],
            ]
        )
    frac = rng.random((n, 3))
    positions = frac @ cell
    charges = rng.normal(size=n)
    if neutral:
        charges -= charges.mean()
    return (
        torch.tensor(positions, dtype=torch.float64),
        torch.tensor(charges, dtype=torch.float64),
        torch.tensor(cell, dtype=torch.float64),
    )


def direct_open_energy(positions: np.ndarray, charges: np.ndarray, smearing: float | None) -> float:
    """Plain double loop over pairs (reference for open boundaries), eV."""
    from scipy.special import erf

    k_e = 14.399645
    energy = 0.0
    n = len(positions)
    for i in range(n):
        for j in range(i + 1, n):
            r = float(np.linalg.norm(positions[i] - positions[j]))
            v = 1.0 / r if smearing is None else erf(r / (np.sqrt(2.0) * smearing)) / r
            energy += charges[i] * charges[j] * v
    return k_e * energy


def cluster(n_side: int = 2, spacing: float = 2.82, seed: int = 0) -> Atoms:
    rng = np.random.default_rng(seed)
    grid = np.array([[i, j, k] for i in range(n_side) for j in range(n_side) for k in range(n_side)], float)
    numbers = [11 if int(p.sum()) % 2 == 0 else 17 for p in grid]
    return Atoms(numbers=numbers, positions=grid * spacing + rng.normal(scale=0.1, size=grid.shape))
