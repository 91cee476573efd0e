"""Generate the finite-field response data set: small molecules in applied fields, GFN2-xTB.

    python data/generate_field.py   # writes data/field_*.xyz and data/field_generation_log.txt

Each configuration is one neutral molecule (water, ammonia, formaldehyde, methanol: the
neutral monomers the shipped base MACE knows), GFN2-xTB-optimised at zero field, then randomly
rotated and rattled, placed in a uniform field E of random direction and magnitude
|E| ~ U(0, E_MAX). Labels, all at that field:

    REF_energy            U(R, E), eV (tblite's energy includes the field term −μ·E)
    REF_forces            −∂U/∂R, eV/Å
    REF_dipole            μ, e·Å (origin independent: every molecule is neutral)
    REF_born_charges      Z[i, α, β] = ∂F_iβ/∂E_α, e, flattened row-major to [N, 9]
    REF_polarizability    α[α, β] = ∂μ_β/∂E_α, e·Å²/V, flattened to 9
    external_field        E, V/Å

tblite gives energies, forces and dipoles at a field but no response tensors, so Z and α
are central differences in the field, E ± H e_α (6 extra SCF solutions per configuration).
Z as ∂F/∂E (rather than ∂μ/∂R, 6N solutions) relies on one energy having both derivatives;
the log checks ∂F/∂E against ∂μ/∂R and −∂U/∂E against μ on one configuration per molecule.

Outputs (extxyz):
    data/field_train.xyz   200 configurations (50 per molecule), seed 21
    data/field_valid.xyz    32 configurations (8 per molecule), seed 22
    data/field_test.xyz     60 configurations (15 per molecule), seed 23 (independent)
    data/field_generation_log.txt  settings, consistency checks and statistics of every split

Deterministic: fixed seeds, numpy.random.default_rng. See data/README.md.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny molecules: threads only add overhead

import time
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.build import molecule
from ase.io import write
from ase.optimize import BFGS
from ase.units import Bohr, Hartree, kB
from tblite.ase import TBLite
from tblite.interface import Calculator
from tblite.library import ffi

HERE = Path(__file__).resolve().parent
METHOD = "GFN2-xTB"
ACCURACY = 0.01  # tblite accuracy (SCF convergence 100x tighter than default, for clean differences)
# the neutral monomers of the dimer set (data/base_mace_dimers.model was trained on all four;
# the broad data/base_mace.model on all but H2O, which it holds out)
MOLECULES = ["H2O", "NH3", "H2CO", "CH3OH"]
SPLITS = {"train": (21, 50), "valid": (22, 8), "test": (23, 15)}  # name: (seed, per molecule)
E_MAX = 0.5  # V/Å, largest field magnitude
RATTLE = 0.04  # Å, Gaussian rattle of every Cartesian component
H_FIELD = 0.01  # V/Å, step of the central differences in the field
H_POS = 0.002  # Å, step of the check ∂μ/∂R

LOG: list[str] = []


def log(msg: str = "") -> None:
    print(msg, flush=True)
    LOG.append(msg)


def evaluate(atoms: Atoms, field: np.ndarray):
    """Energy (eV), forces (eV/Å) and dipole (e·Å) of ``atoms`` in a uniform ``field`` (V/Å).

    Uses tblite's Python interface directly: tblite 0.8.0's ASE calculator hands the field
    array to the C library without converting it to a pointer (TypeError), so the field is
    passed here as a C double pointer to a buffer that lives for the call.
    """
    calc = Calculator(METHOD, atoms.numbers, atoms.positions / Bohr, charge=0.0)
    calc.set("accuracy", ACCURACY)
    calc.set("temperature", 300.0 * kB / Hartree)
    calc.set("verbosity", 0)
    efield = np.ascontiguousarray(np.asarray(field, dtype=np.float64) * Bohr / Hartree)  # Eh/(e·Bohr)
    calc.add("electric-field", ffi.cast("double*", efield.ctypes.data))
    res = calc.singlepoint()
    energy = float(res.get("energy")) * Hartree
    forces = -np.array(res.get("gradient")) * Hartree / Bohr
    dipole = np.array(res.get("dipole")) * Bohr
    return energy, forces, dipole


def response(atoms: Atoms, field: np.ndarray):
    """Z [N, 3, 3] (∂F_iβ/∂E_α) and α [3, 3] (∂μ_β/∂E_α) by central differences in the field."""
    n = len(atoms)
    z = np.zeros((n, 3, 3))
    alpha = np.zeros((3, 3))
    for a in range(3):
        step = np.zeros(3)
        step[a] = H_FIELD
        _, f_plus, mu_plus = evaluate(atoms, field + step)
        _, f_minus, mu_minus = evaluate(atoms, field - step)
        z[:, a, :] = (f_plus - f_minus) / (2 * H_FIELD)
        alpha[a, :] = (mu_plus - mu_minus) / (2 * H_FIELD)
    return z, alpha


def optimised(name: str) -> Atoms:
    atoms = molecule(name)
    atoms.calc = TBLite(method=METHOD, accuracy=ACCURACY, verbosity=0)
    BFGS(atoms, logfile=None).run(fmax=0.005, steps=500)
    atoms.calc = None
    atoms.positions -= atoms.get_center_of_mass()
    return atoms


def check(name: str, atoms: Atoms, field: np.ndarray) -> None:
    """Log the consistency of the labels on one configuration."""
    energy, _, mu = evaluate(atoms, field)
    z, alpha = response(atoms, field)
    # μ against −∂U/∂E
    grad = np.zeros(3)
    for a in range(3):
        step = np.zeros(3)
        step[a] = H_FIELD
        grad[a] = (evaluate(atoms, field + step)[0] - evaluate(atoms, field - step)[0]) / (2 * H_FIELD)
    # Z as ∂μ_α/∂R_iβ, from displaced atoms
    z_pos = np.zeros_like(z)
    for i in range(len(atoms)):
        for b in range(3):
            plus, minus = atoms.copy(), atoms.copy()
            plus.positions[i, b] += H_POS
            minus.positions[i, b] -= H_POS
            z_pos[i, :, b] = (evaluate(plus, field)[2] - evaluate(minus, field)[2]) / (2 * H_POS)
    log(
        f"  {name:7s} |μ| {np.linalg.norm(mu):.4f} e·Å; max|μ + ∂U/∂E| {np.abs(mu + grad).max():.2e}; "
        f"max|∂F/∂E − ∂μ/∂R| {np.abs(z - z_pos).max():.2e} e (max|Z| {np.abs(z).max():.3f}); "
        f"max|α − αᵀ| {np.abs(alpha - alpha.T).max():.2e} (max|α| {np.abs(alpha).max():.4f}); "
        f"max|Σ_i Z_i| {np.abs(z.sum(0)).max():.2e}"
    )


def random_field(rng: np.random.Generator) -> np.ndarray:
    direction = rng.normal(size=3)
    return direction / np.linalg.norm(direction) * rng.uniform(0.0, E_MAX)


def make_split(name: str, seed: int, per_molecule: int, minima: dict) -> list:
    rng = np.random.default_rng(seed)
    frames = []
    for mol in MOLECULES:
        for _ in range(per_molecule):
            atoms = minima[mol].copy()
            rotation = _random_rotation(rng)
            atoms.positions = atoms.positions @ rotation.T + rng.normal(
                scale=RATTLE, size=atoms.positions.shape
            )
            field = random_field(rng)
            energy, forces, dipole = evaluate(atoms, field)
            z, alpha = response(atoms, field)
            atoms.info.update(
                {
                    "REF_energy": energy,
                    "REF_dipole": dipole,
                    "REF_polarizability": alpha.reshape(9),
                    "external_field": field,
                    "charge": 0,
                    "molecule": mol,
                    "config_type": f"field_{mol}",
                }
            )
            atoms.arrays["REF_forces"] = forces
            atoms.arrays["REF_born_charges"] = z.reshape(len(atoms), 9)
            frames.append(atoms)
    mu = np.array([a.info["REF_dipole"] for a in frames])
    alpha = np.array([a.info["REF_polarizability"] for a in frames])
    z = np.concatenate([a.arrays["REF_born_charges"] for a in frames])
    e = np.array([np.linalg.norm(a.info["external_field"]) for a in frames])
    log(
        f"{name}: {len(frames)} configurations ({per_molecule} per molecule), seed {seed}; "
        f"|E| {e.min():.3f}–{e.max():.3f} V/Å; std of μ components {mu.std():.4f} e·Å, "
        f"of Z components {z.std():.4f} e, of α components {alpha.std():.5f} e·Å²/V"
    )
    return frames


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def main() -> None:
    start = time.time()
    log(f"method {METHOD}, tblite accuracy {ACCURACY}, field steps {H_FIELD} V/Å, |E| ≤ {E_MAX} V/Å")
    log(f"rattle σ = {RATTLE} Å, molecules {', '.join(MOLECULES)}")
    minima = {name: optimised(name) for name in MOLECULES}
    log("consistency of the labels (one rattled configuration per molecule at a 0.3 V/Å field):")
    rng = np.random.default_rng(0)
    for name, atoms in minima.items():
        probe = atoms.copy()
        probe.positions += rng.normal(scale=RATTLE, size=probe.positions.shape)
        field = random_field(rng)
        check(name, probe, field / np.linalg.norm(field) * 0.3)
    for split, (seed, per) in SPLITS.items():
        frames = make_split(split, seed, per, minima)
        write(HERE / f"field_{split}.xyz", frames, format="extxyz")
    log(f"wall time {time.time() - start:.0f} s")
    (HERE / "field_generation_log.txt").write_text("\n".join(LOG) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
