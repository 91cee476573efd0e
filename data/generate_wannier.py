"""Generate the Wannier-centroid data set: small water clusters, B3LYP/6-31G** with pyscf.

    python data/generate_wannier.py           # writes data/wannier_*.xyz and data/wannier_generation_log.txt
    python data/generate_wannier.py --check   # one monomer + one dimer, prints the check, writes nothing

Reference data for a DPLR-style "wannier" block: each oxygen carries an ion charge +6 e (8
protons minus its two 1s core electrons), each hydrogen +1 e, and the 8 valence electrons of
a water molecule sit as a charge −8 e at the oxygen's Wannier centroid W_O, the mean of the
centres of its four doubly occupied localised valence orbitals. Labels per configuration:

    REF_energy              B3LYP total energy, eV
    REF_forces              −∂E/∂R, eV/Å
    REF_dipole              SCF dipole (electrons + nuclei) about the origin, e·Å
    REF_wannier_centroids   [N, 3], Å: W_O on the oxygen rows, NaN on the hydrogen rows

The localised orbitals are Boys orbitals of the occupied valence space (the lowest n_O
canonical orbitals, the O 1s cores, are left out). Each orbital centre ⟨φ|r|φ⟩ is assigned
to its nearest oxygen; a configuration in which some oxygen does not get exactly four is
redrawn. Check, per configuration: the dipole rebuilt from the point charges,
μ_W = Σ_O 6 R_O + Σ_H R_H − Σ_O 8 W_O, against the SCF dipole. The two differ only by
twice the summed displacement of the core-orbital centres from their nuclei.

Outputs (extxyz, pbc False, no cell):
    data/wannier_train.xyz   160 configurations (40 monomer, 50 dimer, 40 trimer, 30 tetramer), seed 31
    data/wannier_valid.xyz    24 configurations (6/8/6/4), seed 32
    data/wannier_test.xyz     40 configurations (10/12/10/8), seed 33 (independent draw)
    data/wannier_generation_log.txt  method, versions, per-configuration checks, statistics

Deterministic: fixed seeds, numpy.random.default_rng, one thread. See data/README.md.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # small molecules on a shared 2-core machine

import argparse
import platform
import sys
import time
from pathlib import Path

import ase
import numpy as np
import pyscf
from ase import Atoms
from ase.build import molecule
from ase.calculators.calculator import Calculator, all_changes
from ase.io import read, write
from ase.optimize import BFGS
from pyscf import dft, gto, lo

HERE = Path(__file__).resolve().parent

# CODATA 2018; every conversion to and from atomic units in this script uses these two numbers
BOHR = 0.529177210903  # Å
HARTREE = 27.211386245988  # eV

XC = "b3lyp"  # pyscf's B3LYP = libxc HYB_GGA_XC_B3LYP (VWN-RPA correlation, as in Gaussian)
BASIS = "6-31g**"
AUXBASIS = "cc-pvdz-jkfit"  # density fitting of J and K; pyscf's own default for this basis
GRID_LEVEL = 3  # pyscf default
CONV_TOL = 1e-10  # Hartree, SCF energy convergence

ION_CHARGE = {8: 6.0, 1: 1.0}  # e; the O 1s pair is taken to sit on the nucleus
WANNIER_CHARGE = -8.0  # e, four doubly occupied valence orbitals per oxygen
ORBITALS_PER_O = 4

RATTLE_MONOMER = 0.04  # Å, Gaussian rattle per Cartesian component
RATTLE_CLUSTER = 0.02  # Å, for the molecules of dimers, trimers and tetramers
DIMER_OO = (2.7, 6.0)  # Å, O–O distance of dimers, uniform
CLUSTER_OO = (2.6, 5.5)  # Å, trimers and tetramers: every O–O ≥ 2.6, each molecule ≤ 5.5 from another
MIN_HO = 1.6  # Å, smallest intermolecular H–O distance (dimers, trimers, tetramers)
MIN_HH = 1.5  # Å, smallest intermolecular H–H distance
FMAX = 0.01  # eV/Å, monomer optimisation

CONFIG_TYPES = {"monomer": 1, "dimer": 2, "trimer": 3, "tetramer": 4}  # name: molecules
SPLITS = {  # name: (seed, configurations per type)
    "train": (31, {"monomer": 40, "dimer": 50, "trimer": 40, "tetramer": 30}),
    "valid": (32, {"monomer": 6, "dimer": 8, "trimer": 6, "tetramer": 4}),
    "test": (33, {"monomer": 10, "dimer": 12, "trimer": 10, "tetramer": 8}),
}
CHECK_SEED = 30
CHECK_TOL = 5e-3  # e·Å, largest |μ_W − μ_SCF| accepted by --check

LOG: list[str] = []


def log(msg: str = "") -> None:
    print(msg, flush=True)
    LOG.append(msg)


# ---------------------------------------------------------------------------------------------
# reference calculation


def run_scf(atoms: Atoms):
    """Converged density-fitted RKS of a neutral closed-shell ``atoms`` (positions in Å)."""
    mol = gto.M(
        atom=[(int(z), tuple(p / BOHR)) for z, p in zip(atoms.numbers, atoms.positions)],
        unit="Bohr",
        basis=BASIS,
        charge=0,
        spin=0,
        verbose=0,
    )
    mf = dft.RKS(mol, xc=XC).density_fit(auxbasis=AUXBASIS)
    mf.grids.level = GRID_LEVEL
    mf.conv_tol = CONV_TOL
    mf.max_cycle = 100
    mf.verbose = 0
    mf.kernel()
    if not mf.converged:
        raise RuntimeError(f"SCF not converged for {atoms.get_chemical_formula()}")
    return mol, mf


def energy_forces(mf) -> tuple[float, np.ndarray]:
    energy = float(mf.e_tot) * HARTREE
    grad = mf.nuc_grad_method()
    grad.verbose = 0
    forces = -np.asarray(grad.kernel()) * HARTREE / BOHR
    return energy, forces


def wannier_centres(mol, mf, atoms: Atoms):
    """Boys-localised valence orbitals: their centres [n_occ − n_O, 3] (Å) and owning oxygen."""
    oxygens = np.flatnonzero(atoms.numbers == 8)
    n_core = len(oxygens)
    n_occ = mol.nelectron // 2
    eps = np.asarray(mf.mo_energy)
    # the cores are the n_O lowest orbitals, far below the valence (O 1s ≈ −19 Eh, O 2s ≈ −1 Eh)
    if not (eps[n_core - 1] < -10.0 < -3.0 < eps[n_core]):
        raise RuntimeError(f"core/valence split unclear: ε {eps[n_core - 1]:.3f}, {eps[n_core]:.3f} Eh")
    boys = lo.Boys(mol, mf.mo_coeff[:, n_core:n_occ])
    boys.verbose = 0
    coeff = boys.kernel()
    with mol.with_common_orig((0.0, 0.0, 0.0)):
        r_ao = mol.intor_symmetric("int1e_r")
    centres = np.einsum("xpq,pi,qi->ix", r_ao, coeff, coeff) * BOHR
    distance = np.linalg.norm(centres[:, None, :] - atoms.positions[oxygens][None, :, :], axis=-1)
    owner = np.argmin(distance, axis=1)  # index into ``oxygens``
    return centres, owner


def label(atoms: Atoms) -> dict:
    """Run the reference on ``atoms``; return labels and checks (``ok`` False: orbital count wrong)."""
    start = time.time()
    mol, mf = run_scf(atoms)
    oxygens = np.flatnonzero(atoms.numbers == 8)
    centres, owner = wannier_centres(mol, mf, atoms)
    counts = np.bincount(owner, minlength=len(oxygens))
    out = {"counts": counts, "ok": bool(np.all(counts == ORBITALS_PER_O)), "cycles": mf.cycles}
    if not out["ok"]:
        out["time"] = time.time() - start
        return out
    centroids = np.full((len(atoms), 3), np.nan)
    for k, i in enumerate(oxygens):
        centroids[i] = centres[owner == k].mean(axis=0)
    energy, forces = energy_forces(mf)
    dipole = np.asarray(mf.dip_moment(unit="AU", verbose=0)) * BOHR  # e·Bohr -> e·Å, origin 0
    ion = np.array([ION_CHARGE[int(z)] for z in atoms.numbers])
    mu_w = ion @ atoms.positions + WANNIER_CHARGE * centroids[oxygens].sum(axis=0)
    out.update(
        energy=energy,
        forces=forces,
        dipole=dipole,
        centroids=centroids,
        mu_w=mu_w,
        mu_err=float(np.linalg.norm(mu_w - dipole)),
        w_dist=np.linalg.norm(centroids[oxygens] - atoms.positions[oxygens], axis=1),
        time=time.time() - start,
    )
    return out


class PySCFCalculator(Calculator):
    """Minimal ASE calculator around :func:`run_scf` (energy and forces), for the optimisation."""

    implemented_properties = ["energy", "forces"]

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        _, mf = run_scf(self.atoms)
        energy, forces = energy_forces(mf)
        self.results = {"energy": energy, "forces": forces}


def optimised_water() -> Atoms:
    atoms = molecule("H2O")  # ASE g2 geometry as the start, atom order O, H, H
    atoms.calc = PySCFCalculator()
    opt = BFGS(atoms, logfile=None)
    opt.run(fmax=FMAX, steps=200)
    fmax = float(np.abs(atoms.get_forces()).max())
    energy = atoms.get_potential_energy()
    atoms.calc = None
    atoms.positions -= atoms.positions[0]  # O at the origin: molecules are placed by their oxygen
    d1, d2 = atoms.get_distance(0, 1), atoms.get_distance(0, 2)
    log(
        f"optimised water ({opt.nsteps} BFGS steps, max |F| {fmax:.4f} eV/Å): E {energy:.6f} eV, "
        f"r(OH) {d1:.4f} / {d2:.4f} Å, ∠HOH {atoms.get_angle(1, 0, 2):.2f}°"
    )
    for symbol, p in zip(atoms.get_chemical_symbols(), atoms.positions):
        log(f"  {symbol} {p[0]:12.8f} {p[1]:12.8f} {p[2]:12.8f}")
    return atoms


# ---------------------------------------------------------------------------------------------
# configurations


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """Uniformly distributed rotation matrix, from a random unit quaternion."""
    q = rng.normal(size=4)
    w, x, y, z = q / np.linalg.norm(q)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
        ]
    )


def random_direction(rng: np.random.Generator) -> np.ndarray:
    v = rng.normal(size=3)
    return v / np.linalg.norm(v)


def water_at(water: Atoms, oxygen: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Positions of a randomly rotated, rattled copy of ``water`` whose oxygen sits at ``oxygen``."""
    pos = water.positions @ random_rotation(rng).T + rng.normal(scale=sigma, size=(len(water), 3))
    return pos - pos[0] + oxygen


def clashes(positions: np.ndarray, numbers: np.ndarray, molecule_id: np.ndarray) -> bool:
    """True if two atoms of different molecules form an H–O < MIN_HO or H–H < MIN_HH contact."""
    d = np.linalg.norm(positions[:, None] - positions[None, :], axis=-1)
    other = molecule_id[:, None] != molecule_id[None, :]
    h = numbers == 1
    o = numbers == 8
    ho = other & h[:, None] & o[None, :]
    hh = other & h[:, None] & h[None, :]
    return bool((d[ho] < MIN_HO).any() or (d[hh] < MIN_HH).any())


def oxygen_sites(n: int, rng: np.random.Generator) -> np.ndarray:
    """O positions of an n-molecule cluster, grown one molecule at a time.

    Each new oxygen sits at a distance U(CLUSTER_OO) in a random direction from a randomly
    chosen earlier one, and is redrawn while it comes closer than CLUSTER_OO[0] to any oxygen.
    So every O–O is ≥ 2.6 Å and every molecule is within 5.5 Å of another (connected).
    For n = 2 the distance is U(DIMER_OO) instead.
    """
    sites = [np.zeros(3)]
    low, high = DIMER_OO if n == 2 else CLUSTER_OO
    while len(sites) < n:
        anchor = sites[rng.integers(len(sites))]
        trial = anchor + rng.uniform(low, high) * random_direction(rng)
        if min(np.linalg.norm(trial - s) for s in sites) >= CLUSTER_OO[0]:
            sites.append(trial)
    return np.array(sites)


def draw_configuration(water: Atoms, n: int, rng: np.random.Generator, stats: dict) -> Atoms:
    """One configuration of ``n`` water molecules, centre of mass at the origin."""
    numbers = np.tile(water.numbers, n)
    molecule_id = np.repeat(np.arange(n), len(water))
    if n == 1:
        positions = water_at(water, np.zeros(3), RATTLE_MONOMER, rng)
    else:
        while True:
            sites = oxygen_sites(n, rng)
            for _ in range(50):  # orientations for these sites, then new sites
                positions = np.concatenate([water_at(water, s, RATTLE_CLUSTER, rng) for s in sites])
                if not clashes(positions, numbers, molecule_id):
                    break
                stats["clash"] += 1
            else:
                continue
            break
    atoms = Atoms(numbers=numbers, positions=positions, pbc=False)
    atoms.positions -= atoms.get_center_of_mass()
    return atoms


def oo_distances(atoms: Atoms) -> np.ndarray:
    o = atoms.positions[atoms.numbers == 8]
    i, j = np.triu_indices(len(o), 1)
    return np.linalg.norm(o[i] - o[j], axis=1)


def labelled(water: Atoms, config_type: str, rng: np.random.Generator, stats: dict, tag: str) -> Atoms:
    """Draw configurations of ``config_type`` until one passes the orbital count; label it."""
    while True:
        atoms = draw_configuration(water, CONFIG_TYPES[config_type], rng, stats)
        res = label(atoms)
        if res["ok"]:
            break
        stats["rejected"] += 1
        log(f"  {tag:11s} {config_type:8s} rejected: orbitals per oxygen {res['counts'].tolist()}, redrawn")
    atoms.info.update(
        {"REF_energy": res["energy"], "REF_dipole": res["dipole"], "charge": 0, "config_type": config_type}
    )
    atoms.arrays["REF_forces"] = res["forces"]
    atoms.arrays["REF_wannier_centroids"] = res["centroids"]
    oo = oo_distances(atoms)
    oo_text = f"O–O {oo.min():.2f}–{oo.max():.2f} Å" if len(oo) else "O–O –"
    log(
        f"  {tag:11s} {config_type:8s} E {res['energy']:14.6f} eV  "
        f"|μ| {np.linalg.norm(res['dipole']):.4f} e·Å  "
        f"|μ_W − μ_SCF| {res['mu_err']:.2e} e·Å  "
        f"|W−R| {res['w_dist'].min():.4f}–{res['w_dist'].max():.4f} Å  "
        f"{oo_text}  {res['cycles']} cycles  {res['time']:.1f} s"
    )
    stats["mu_err"].append(res["mu_err"])
    stats["w_dist"].extend(res["w_dist"].tolist())
    return atoms


# ---------------------------------------------------------------------------------------------
# splits, checks, main


def make_split(name: str, seed: int, counts: dict, water: Atoms) -> list:
    rng = np.random.default_rng(seed)
    log(f"{name}: seed {seed}, " + ", ".join(f"{n} {t}" for t, n in counts.items()))
    start = time.time()
    frames = []
    per_type = {}
    for config_type, count in counts.items():
        stats = {"clash": 0, "rejected": 0, "mu_err": [], "w_dist": []}
        t0 = time.time()
        for k in range(count):
            frames.append(labelled(water, config_type, rng, stats, f"{name}[{len(frames)}]"))
        stats["time"] = time.time() - t0
        per_type[config_type] = stats
    log(f"{name} summary ({len(frames)} configurations, {time.time() - start:.0f} s):")
    for config_type, stats in per_type.items():
        err = np.array(stats["mu_err"])
        w = np.array(stats["w_dist"])
        sub = [a for a in frames if a.info["config_type"] == config_type]
        mu = np.array([a.info["REF_dipole"] for a in sub])
        f = np.concatenate([a.arrays["REF_forces"] for a in sub])
        log(
            f"  {config_type:8s} n {len(sub):3d}: max |μ_W − μ_SCF| {err.max():.2e} e·Å "
            f"(mean {err.mean():.2e}); "
            f"|W−R| {w.min():.4f}–{w.max():.4f} Å (mean {w.mean():.4f}); "
            f"|μ| {np.linalg.norm(mu, axis=1).min():.3f}–{np.linalg.norm(mu, axis=1).max():.3f} e·Å; "
            f"RMS F component {np.sqrt((f**2).mean()):.3f} eV/Å; clash redraws {stats['clash']}, "
            f"orbital-count rejections {stats['rejected']}; {stats['time']:.0f} s"
        )
    err = np.concatenate([per_type[t]["mu_err"] for t in per_type])
    w = np.concatenate([per_type[t]["w_dist"] for t in per_type])
    log(
        f"  all      n {len(frames):3d}: max |μ_W − μ_SCF| {err.max():.2e} e·Å; "
        f"|W−R| {w.min():.4f}–{w.max():.4f} Å (mean {w.mean():.4f}, {len(w)} oxygens); "
        f"std of μ components {np.array([a.info['REF_dipole'] for a in frames]).std():.4f} e·Å"
    )
    return frames


def write_split(path: Path, frames: list) -> None:
    write(path, frames, format="extxyz")
    back = read(path, index=":")
    for a, b in zip(frames, back):
        w_a, w_b = a.arrays["REF_wannier_centroids"], b.arrays["REF_wannier_centroids"]
        h = b.numbers == 1
        if not (np.isnan(w_b[h]).all() and np.isfinite(w_b[~h]).all() and np.allclose(w_a[~h], w_b[~h])):
            raise RuntimeError(f"{path.name}: REF_wannier_centroids did not survive the extxyz round trip")
    size = path.stat().st_size / 1024
    log(f"wrote {path.name} ({size:.0f} kB); read back: NaN on all H rows, O rows equal")


def header() -> None:
    log(
        f"method: pyscf RKS {XC.upper()} (libxc HYB_GGA_XC_B3LYP, VWN-RPA), basis {BASIS} (spherical d), "
        f"density fitting of J/K with {AUXBASIS}, grid level {GRID_LEVEL}, conv_tol {CONV_TOL:g} Eh, "
        "neutral closed shell, open boundaries"
    )
    log(f"units: Bohr {BOHR} Å, Hartree {HARTREE} eV (CODATA 2018); geometries handed to pyscf in Bohr")
    log(
        "Wannier centres: Boys localisation (pyscf lo.Boys, atomic initial guess) of the occupied valence "
        "orbitals (lowest n_O canonical orbitals = O 1s excluded); centre <φ|r|φ> (int1e_r, origin 0); "
        f"nearest oxygen; {ORBITALS_PER_O} per oxygen required, else redrawn"
    )
    log(f"point charges: O {ION_CHARGE[8]:+g}, H {ION_CHARGE[1]:+g}, centroid {WANNIER_CHARGE:+g} e")
    log(
        f"versions: pyscf {pyscf.__version__}, ase {ase.__version__}, numpy {np.__version__}, "
        f"python {platform.python_version()}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}"
    )
    log(
        f"configurations: monomer rattle σ {RATTLE_MONOMER} Å; cluster molecules σ {RATTLE_CLUSTER} Å; "
        f"dimer O–O U{DIMER_OO} Å; trimer/tetramer O–O ≥ {CLUSTER_OO[0]} Å, each ≤ {CLUSTER_OO[1]} Å from "
        f"another; intermolecular H–O ≥ {MIN_HO} Å, H–H ≥ {MIN_HH} Å; centre of mass at the origin"
    )


def check() -> int:
    """One rattled monomer and one dimer from the g2 water geometry (no optimisation)."""
    water = molecule("H2O")
    water.positions -= water.positions[0]
    rng = np.random.default_rng(CHECK_SEED)
    failed = False
    for config_type in ("monomer", "dimer"):
        stats = {"clash": 0}
        atoms = draw_configuration(water, CONFIG_TYPES[config_type], rng, stats)
        res = label(atoms)
        if not res["ok"]:
            print(f"{config_type}: orbitals per oxygen {res['counts'].tolist()} (need {ORBITALS_PER_O}) FAIL")
            failed = True
            continue
        bad = res["mu_err"] > CHECK_TOL
        failed |= bad
        print(
            f"{config_type}: μ_SCF {np.round(res['dipole'], 5).tolist()} e·Å, "
            f"μ_W {np.round(res['mu_w'], 5).tolist()} e·Å, |μ_W − μ_SCF| {res['mu_err']:.2e} e·Å "
            f"(tolerance {CHECK_TOL:g}); orbitals per oxygen "
            f"{res['counts'].tolist()}; |W−R| {np.round(res['w_dist'], 4).tolist()} Å; {res['time']:.1f} s "
            + ("FAIL" if bad else "ok")
        )
    print("check FAILED" if failed else "check passed")
    return 1 if failed else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="monomer + dimer check only; writes nothing")
    parser.add_argument("--splits", nargs="+", choices=list(SPLITS), default=list(SPLITS))
    parser.add_argument("--out", type=Path, default=HERE, help="output folder (default: data/)")
    args = parser.parse_args()
    if args.check:
        sys.exit(check())
    start = time.time()
    header()
    water = optimised_water()
    for name in args.splits:
        seed, counts = SPLITS[name]
        write_split(args.out / f"wannier_{name}.xyz", make_split(name, seed, counts, water))
    log(f"wall time {time.time() - start:.0f} s")
    (args.out / "wannier_generation_log.txt").write_text("\n".join(LOG) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
