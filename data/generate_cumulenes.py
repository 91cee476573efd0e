"""Generate the cumulene torsion data set: H2C=C=...=C=CH2 with n = 5 ... 12 carbons.

    python data/generate_cumulenes.py   # writes data/cumulene_*.xyz and data/cumulene_generation_log.txt

The test case of LOREM (long-range equivariant messages): the energy of a cumulene depends on
the torsion angle between the planes of its two terminal CH2 groups (the pi system couples
them through the whole chain), but for the longer chains the two groups are farther apart
than the base model's receptive field (2 interactions x r_max 4.5 A = 9 A), so a local model
sees the same environment at every torsion and cannot learn the barrier.

Each length n is first optimised with GFN2-xTB (ASE BFGS) in its planar form (torsion 0).
A configuration at torsion theta rotates the two hydrogens of the last CH2 group about the
chain axis by theta, then (train/valid only) applies random C=C and C-H stretches and a
Gaussian rattle of every coordinate. Energies are symmetric, E(theta) = E(-theta) =
E(180 - theta), so theta is drawn from [0, 90] degrees.

Outputs (extxyz; energies eV, forces eV/A, lengths A; info: n_carbon, torsion in degrees):
    data/cumulene_train.xyz   n = 5..12, 24 per length, random torsion, rattled (seed 21)
    data/cumulene_valid.xyz   n = 5..12,  4 per length, random torsion, rattled (seed 22)
    data/cumulene_test.xyz    held-out profiles: n = 5..12, torsion 0, 10, ..., 90 degrees,
                              small rattle (0.005 A, seed 23)
    data/cumulene_generation_log.txt  minima, barriers per length, statistics

Deterministic: fixed seeds, numpy.random.default_rng. See data/README.md.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import time
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.io import write
from ase.optimize import BFGS
from tblite.ase import TBLite

HERE = Path(__file__).resolve().parent
METHOD = "GFN2-xTB"
LENGTHS = tuple(range(5, 13))  # number of carbons
R_MAX = 4.5  # A, cutoff of data/base_mace.model (2 interactions)
SPLITS = {"train": (21, 24), "valid": (22, 4)}  # name: (seed, configurations per length)
TEST_SEED = 23
TEST_TORSIONS = tuple(range(0, 91, 10))  # degrees
SIGMA_CC = 0.015  # A, C=C stretch
SIGMA_CH = 0.015  # A, C-H stretch
SIGMA_RATTLE = 0.02  # A, Gaussian rattle of every Cartesian component (train/valid)
SIGMA_RATTLE_TEST = 0.005  # A (test profiles)

LOG: list[str] = []


def log(msg: str = "") -> None:
    print(msg, flush=True)
    LOG.append(msg)


def xtb() -> TBLite:
    return TBLite(method=METHOD, charge=0, verbosity=0)


def template(n: int) -> Atoms:
    """Planar cumulene along z: C1..Cn, then H, H on C1 and H, H on Cn (all in the xz plane)."""
    z = np.arange(n) * 1.29
    pos = [[0.0, 0.0, zz] for zz in z]
    for c, sign in ((0, -1.0), (n - 1, 1.0)):
        for side in (1.0, -1.0):
            pos.append([side * 0.94, 0.0, z[c] + sign * 0.55])
    return Atoms(f"C{n}H4", positions=pos)


def optimise(n: int) -> Atoms:
    mol = template(n)
    mol.calc = xtb()
    BFGS(mol, logfile=None).run(fmax=0.003, steps=500)
    mol.calc = None
    return mol


def twist(ref: Atoms, theta_deg: float) -> Atoms:
    """Rotate the hydrogens on the last carbon about the C1-Cn axis by theta."""
    n = len(ref) - 4
    p = ref.positions.copy()
    axis = p[n - 1] - p[0]
    axis /= np.linalg.norm(axis)
    t = np.radians(theta_deg)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rot = np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k
    for h in (n + 2, n + 3):
        p[h] = p[n - 1] + rot @ (p[h] - p[n - 1])
    return Atoms(ref.get_chemical_symbols(), positions=p, pbc=False)


def distort(atoms: Atoms, rng: np.random.Generator, rattle: float, stretch: bool) -> Atoms:
    a = atoms.copy()
    n = len(a) - 4
    p = a.positions
    if stretch:
        # stretch bond k by moving every atom past it along the axis (hydrogens follow their carbon)
        axis = p[n - 1] - p[0]
        axis /= np.linalg.norm(axis)
        shift = np.concatenate([[0.0], np.cumsum(rng.normal(scale=SIGMA_CC, size=n - 1))])
        owner = list(range(n)) + [0, 0, n - 1, n - 1]
        p += shift[owner][:, None] * axis
        for h in range(n, n + 4):
            c = owner[h]
            d = p[h] - p[c]
            p[h] = p[c] + d * (1 + rng.normal(scale=SIGMA_CH) / np.linalg.norm(d))
    p += rng.normal(scale=rattle, size=p.shape)
    a.positions = p - a.get_center_of_mass()
    return a


def label(atoms: Atoms, n: int, theta: float) -> Atoms:
    atoms.calc = xtb()
    energy = float(atoms.get_potential_energy())
    forces = atoms.get_forces().copy()
    atoms.calc = None
    atoms.info.update(REF_energy=energy, charge=0, n_carbon=n, torsion=float(theta))
    atoms.arrays["REF_forces"] = forces
    return atoms


def main() -> None:
    t0 = time.time()
    log(f"cumulene torsion data, {METHOD} (tblite), lengths {LENGTHS}")
    refs = {}
    for n in LENGTHS:
        refs[n] = optimise(n)
        p = refs[n].positions
        span = float(np.linalg.norm(p[n + 2] - p[n]))  # H on C1 to H on Cn
        cc = np.linalg.norm(np.diff(p[:n], axis=0), axis=1)
        log(f"n={n:2d}: C=C {cc.min():.3f}-{cc.max():.3f} A, terminal H...H {span:.2f} A")
    # clean profiles (no rattle) for the barrier table
    log("\nclean torsion profiles E(theta) - E(0), eV (rigid twist of the optimised planar form)")
    log("n   " + " ".join(f"{t:7d}" for t in TEST_TORSIONS))
    for n in LENGTHS:
        e = [label(twist(refs[n], t), n, t).info["REF_energy"] for t in TEST_TORSIONS]
        log(f"{n:2d}  " + " ".join(f"{x - e[0]:7.3f}" for x in e))
    for name, (seed, per_length) in SPLITS.items():
        rng = np.random.default_rng(seed)
        frames = []
        for n in LENGTHS:
            for _ in range(per_length):
                theta = float(rng.uniform(0.0, 90.0))
                frames.append(label(distort(twist(refs[n], theta), rng, SIGMA_RATTLE, True), n, theta))
        write(HERE / f"cumulene_{name}.xyz", frames, format="extxyz")
        e = np.array([f.info["REF_energy"] for f in frames])
        fm = np.array([np.abs(f.arrays["REF_forces"]).max() for f in frames])
        log(f"\n{name}: {len(frames)} configurations, seed {seed}; max |F| median {np.median(fm):.2f} eV/A")
        log(f"  energy range {e.min():.2f} .. {e.max():.2f} eV")
    rng = np.random.default_rng(TEST_SEED)
    frames = []
    for n in LENGTHS:
        for t in TEST_TORSIONS:
            frames.append(label(distort(twist(refs[n], t), rng, SIGMA_RATTLE_TEST, False), n, t))
    write(HERE / "cumulene_test.xyz", frames, format="extxyz")
    log(f"\ntest: {len(frames)} configurations (profiles), seed {TEST_SEED}")
    log(f"\nwall time {time.time() - t0:.0f} s")
    (HERE / "cumulene_generation_log.txt").write_text("\n".join(LOG) + "\n")


if __name__ == "__main__":
    main()
