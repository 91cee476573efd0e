"""Generate the GFN2-xTB small-molecule data the shipped base MACE is trained on (with the dimers).

    python data/generate_base_molecules.py    # writes data/base_molecules_*.xyz and the log

Species: closed-shell G2 molecules (ase.collections.g2) made of H/C/N/O/F/Cl/Na with at most
12 atoms, plus ions and protonated / deprotonated variants built here (NH4+, NO3-, HCOO-,
CH3COO-, CN-, CO3^2-, HF2-, ...). Radicals (odd electron count, or G2 entries with initial
magnetic moments: triplet O2, NH, CH2) are skipped, so every calculation is a closed-shell
GFN2-xTB singlet at the formal charge. No isolated atoms (F-, Na+, Cl-) are trained on:
a MACE's energy of an atom without neighbours is its E0 alone, so their labels would only
shift the least-squares E0s. No two species share a composition (NO2+ / NO2-, CH3+ / CH3-):
a charge-blind base could tell them apart only by geometry. Every species is optimised (BFGS,
fmax 0.01 eV/Å); it is dropped if the optimised structure falls apart (bond graph not
connected) or its SCF fails. Configurations with a force component above F_MAX, or whose SCF
does not converge, are dropped and logged.

Families held out of the base on purpose (HELD_OUT), so that a leave-family-out benchmark can
test molecules the base has never seen: the water family (H2O, H3O+, OH-), the isolated ions
Na+ and Cl- (and the NaCl molecule), and acetonitrile CH3CN. They are written to
data/base_molecules_heldout.xyz (rattled monomers) and never enter training or validation.

Outputs (extxyz; energies eV, forces eV/Å, dipoles e·Å about the centre of mass, charges e):
    data/base_molecules_train.xyz    rattled monomers (RATTLE amplitudes) + random close pairs
    data/base_molecules_valid.xyz    one rattled copy of every species + pairs, independent seed
    data/base_molecules_heldout.xyz  rattled monomers of the held-out families (never trained on)
    data/base_molecules_generation_log.txt  species list with charges, failures, statistics

Keys follow data/dimers_*.xyz: REF_energy, REF_forces, REF_dipole, REF_charges, charge,
config_type ("base_monomer", "base_pair"; "heldout_monomer" in the held-out file), mol_A,
mol_B, separation, rattle.
Deterministic: fixed seeds, numpy.random.default_rng.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny molecules: threads only add overhead

import sys
import time
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.build import molecule
from ase.collections import g2
from ase.data import covalent_radii
from ase.io import write
from ase.optimize import BFGS

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from generate_dimers import FORMAL_CHARGE as DIMER_CHARGE  # noqa: E402
from generate_dimers import (  # noqa: E402  (same reference method and geometry helpers)
    _lone_pair_h,
    _tetrahedron,
    make_dimer,
    monomer_templates,
    place,
    xtb,
)

ELEMENTS = {"H", "C", "N", "O", "F", "Cl", "Na"}
MAX_ATOMS = 12
SEED_TRAIN, SEED_VALID, SEED_HELDOUT = 21, 22, 23
RATTLE = (0.0, 0.03, 0.06, 0.09, 0.12)  # Å, one training configuration per amplitude and species
F_MAX = 30.0  # eV/Å, configurations with a larger force component are dropped (logged)
N_PAIRS = {"train": 120, "valid": 20}
PAIR_R = (3.0, 5.0)  # Å, centre-of-mass separation of the random close pairs
PAIR_MAX_ATOMS = 16
HELD_OUT_G2 = {"H2O", "CH3CN", "NaCl"}

LOG: list[str] = []


def log(msg: str = "") -> None:
    print(msg, flush=True)
    LOG.append(msg)


def _linear(symbols: str, bonds: list[float]) -> Atoms:
    z = np.concatenate([[0.0], np.cumsum(bonds)])
    return Atoms(symbols, positions=[[0, 0, x] for x in z])


def _planar_star(centre: str, ligand: str, n: int, bond: float) -> Atoms:
    pos = [[0, 0, 0]] + [
        [bond * np.cos(2 * np.pi * k / n), bond * np.sin(2 * np.pi * k / n), 0] for k in range(n)
    ]
    return Atoms(centre + ligand * n, positions=pos)


def _strip_h(mol: Atoms, near: str) -> Atoms:
    """Copy of mol without the hydrogen bonded to the first atom `near` (deprotonation)."""
    mol = mol.copy()
    sym = mol.get_chemical_symbols()
    i = sym.index(near)
    d = mol.get_distances(i, range(len(mol)))
    h = min((j for j, s in enumerate(sym) if s == "H"), key=lambda j: d[j])
    del mol[h]
    return mol


def _guanidinium() -> Atoms:
    pos, sym = [[0, 0, 0]], ["C"]
    for k in range(3):
        u = np.array([np.cos(2 * np.pi * k / 3), np.sin(2 * np.pi * k / 3), 0])
        n = 1.33 * u
        pos.append(n)
        sym.append("N")
        for s in (+1, -1):
            a = 2 * np.pi * k / 3 + s * np.radians(60)
            pos.append(n + 1.01 * np.array([np.cos(a), np.sin(a), 0]))
            sym.append("H")
    return Atoms(sym, positions=pos)


def built_species() -> dict[str, tuple[Atoms, int]]:
    """Ions and variants made here: name -> (start geometry, formal charge)."""
    t = _tetrahedron()
    dimer = monomer_templates()
    # the dimer set's ions (its neutrals are G2 entries; water is held out)
    s = {name: (dimer[name], q) for name, q in DIMER_CHARGE.items() if q != 0}
    s.update({
        "CN-": (_strip_h(molecule("HCN"), "C"), -1),
        "NO2-": (molecule("NO2"), -1),
        "CO3^2-": (_planar_star("C", "O", 3, 1.29), -2),
        "NH2-": (molecule("NH2"), -1),
        "CH3O-": (_strip_h(molecule("CH3OH"), "O"), -1),
        "CH3OH2+": (_lone_pair_h(molecule("CH3OH"), "O", 0.98), +1),
        "CH2OH+": (_lone_pair_h(molecule("H2CO"), "O", 0.98), +1),
        "HCNH+": (_lone_pair_h(molecule("HCN"), "N", 1.01), +1),
        "N2H5+": (_lone_pair_h(molecule("N2H4"), "N", 1.03), +1),
        "HO2-": (_strip_h(molecule("H2O2"), "O"), -1),
        "HC2-": (_strip_h(molecule("C2H2"), "C"), -1),
        "C(NH2)3+": (_guanidinium(), +1),
        "N3-": (_linear("NNN", [1.18, 1.18]), -1),
        "OCN-": (_linear("OCN", [1.22, 1.17]), -1),
        "HF2-": (_linear("FHF", [1.14, 1.14]), -1),
        "ClO-": (_linear("ClO", [1.65]), -1),
        "ClO4-": (Atoms("ClO4", positions=np.vstack([[0, 0, 0], 1.45 * t])), -1),
        "HCOOH2+": (_lone_pair_h(molecule("HCOOH"), "O", 0.98), +1),
        "NaF": (_linear("NaF", [1.93]), 0),
        "NaH": (_linear("NaH", [1.89]), 0),
        "NaCN": (_linear("NaCN", [2.25, 1.17]), 0),
        "HCOONa": (dimer["formate"] + Atoms("Na", positions=[[0, 0, -2.3]]), 0),
        "NaNO3": (dimer["nitrate"] + Atoms("Na", positions=[[-1.9, -1.1, 0]]), 0),
    })  # fmt: skip
    return s


def held_out_species() -> dict[str, tuple[Atoms, int]]:
    water = molecule("H2O")
    return {
        "H2O": (water, 0),
        "H3O+": (_lone_pair_h(water, "O", 0.98), +1),
        "OH-": (_strip_h(water, "O"), -1),
        "Na+": (Atoms("Na"), +1),
        "Cl-": (Atoms("Cl"), -1),
        "NaCl": (molecule("NaCl"), 0),
        "CH3CN": (molecule("CH3CN"), 0),
    }


def g2_species() -> tuple[dict[str, tuple[Atoms, int]], list[str]]:
    out, skipped = {}, []
    for name in g2.names:
        a = molecule(name)
        if not set(a.get_chemical_symbols()) <= ELEMENTS or name in HELD_OUT_G2:
            continue
        if len(a) < 2 or len(a) > MAX_ATOMS:
            skipped.append(f"{name} ({len(a)} atoms)")
        elif np.abs(a.get_initial_magnetic_moments()).sum() > 0 or a.numbers.sum() % 2:
            skipped.append(f"{name} (open shell)")
        else:
            out[name] = (a, 0)
    return out, skipped


def connected(at: Atoms, scale: float = 1.3) -> bool:
    if len(at) == 1:
        return True
    r = covalent_radii[at.numbers]
    bonded = at.get_all_distances() < scale * (r[:, None] + r[None])
    seen, todo = {0}, [0]
    while todo:
        i = todo.pop()
        for j in np.flatnonzero(bonded[i]):
            if j not in seen:
                seen.add(int(j))
                todo.append(int(j))
    return len(seen) == len(at)


def optimise(species: dict[str, tuple[Atoms, int]], failures: list[str]) -> dict:
    out = {}
    for name, (mol, q) in species.items():
        if (mol.numbers.sum() - q) % 2:
            failures.append(f"{name} (charge {q:+d}): odd electron count, skipped")
            continue
        mol = Atoms(mol.numbers, mol.positions)
        try:
            if len(mol) > 1:
                mol.calc = xtb(q)
                converged = BFGS(mol, logfile=None).run(fmax=0.01, steps=300)
                if not converged:
                    failures.append(f"{name} (charge {q:+d}): BFGS not converged in 300 steps, kept")
        except Exception as err:  # tblite raises on a non-converged SCF
            failures.append(f"{name} (charge {q:+d}): optimisation failed ({err}), skipped")
            continue
        mol = Atoms(mol.numbers, mol.positions - mol.get_center_of_mass())
        if not connected(mol):
            failures.append(f"{name} (charge {q:+d}): fell apart on optimisation, skipped")
            continue
        out[name] = (mol, q)
    return out


def label(at: Atoms, q: int, info: dict, failures: list[str]) -> Atoms | None:
    """GFN2-xTB single point; None (logged) if the SCF fails or the charges do not add up."""
    at = Atoms(at.numbers, at.positions, pbc=False)
    at.calc = xtb(q)
    try:
        e, f = at.get_potential_energy(), at.get_forces()
        mu, ch = at.get_dipole_moment(), at.get_charges()
    except Exception as err:
        failures.append(f"{info['mol_A']}+{info['mol_B']} rattle {info['rattle']}: SCF failed ({err})")
        return None
    if np.abs(f).max() > F_MAX:
        failures.append(f"{info['mol_A']}+{info['mol_B']} rattle {info['rattle']}: max |F| "
                        f"{np.abs(f).max():.1f} eV/Å > {F_MAX}, dropped")  # fmt: skip
        return None
    if abs(ch.sum() - q) > 1e-4:
        failures.append(f"{info['mol_A']}: charges sum to {ch.sum():.4f}, not {q}")
        return None
    at.calc = None
    at.info.update(REF_energy=float(e), REF_dipole=np.asarray(mu, float), charge=int(q), **info)
    at.arrays["REF_forces"] = np.asarray(f, float)
    at.arrays["REF_charges"] = np.asarray(ch, float)
    return at


def monomers(mono: dict, rattles, rng, failures, kind: str = "base_monomer") -> list[Atoms]:
    frames = []
    for name, (mol, q) in mono.items():
        for amp in rattles if len(mol) > 1 else rattles[:1]:
            m = place(mol, rng, amp)
            info = dict(config_type=kind, mol_A=name, mol_B="none", separation=0.0,
                        rattle=float(amp))  # fmt: skip
            at = label(m, q, info, failures)
            if at is not None:
                frames.append(at)
    return frames


def pairs(mono: dict, n: int, rng, failures) -> list[Atoms]:
    names = sorted(mono)
    frames, tries = [], 0
    while len(frames) < n and tries < 20 * n:
        tries += 1
        a, b = rng.choice(names, size=2)
        qa, qb = mono[a][1], mono[b][1]
        if len(mono[a][0]) + len(mono[b][0]) > PAIR_MAX_ATOMS or abs(qa + qb) > 2:
            continue
        r = rng.uniform(*PAIR_R)
        lookup = {k: v[0] for k, v in mono.items()}
        built = make_dimer(lookup, a, b, r, rng, 0.03)
        if built is None:
            continue
        info = dict(config_type="base_pair", mol_A=str(a), mol_B=str(b), separation=float(r),
                    rattle=0.03)  # fmt: skip
        at = label(built[0], qa + qb, info, failures)
        if at is not None:
            frames.append(at)
    return frames


def describe(mono: dict) -> list[str]:
    rows = []
    for name, (mol, q) in sorted(mono.items(), key=lambda kv: (kv[1][1], kv[0])):
        rows.append(f"  {name:<22} {mol.get_chemical_formula():<10} charge {q:+d}  {len(mol)} atoms")
    return rows


def main() -> None:
    t0 = time.time()
    failures: list[str] = []
    g2s, skipped = g2_species()
    species = {**g2s, **built_species()}
    log(f"# GFN2-xTB (tblite) base-model molecules; {len(g2s)} G2 + {len(species) - len(g2s)} built")
    log("G2 entries with allowed elements skipped: " + ", ".join(skipped))
    mono = optimise(species, failures)
    held = optimise(held_out_species(), failures)
    log(f"\n## {len(mono)} training species (name, formula, formal charge)")
    for row in describe(mono):
        log(row)
    log(f"\n## {len(held)} held-out species (never in training or validation)")
    for row in describe(held):
        log(row)

    splits = {
        "train": monomers(mono, RATTLE, np.random.default_rng(SEED_TRAIN), failures)
        + pairs(mono, N_PAIRS["train"], np.random.default_rng(SEED_TRAIN + 100), failures),
    }
    rng = np.random.default_rng(SEED_VALID)
    splits["valid"] = [
        f
        for name in mono
        for f in monomers({name: mono[name]}, [float(rng.choice(RATTLE[1:]))], rng, failures)
    ] + pairs(mono, N_PAIRS["valid"], np.random.default_rng(SEED_VALID + 100), failures)
    splits["heldout"] = monomers(
        held, (0.0, 0.05, 0.10), np.random.default_rng(SEED_HELDOUT), failures, "heldout_monomer"
    )

    log("\n## splits")
    for name, frames in splits.items():
        write(HERE / f"base_molecules_{name}.xyz", frames, format="extxyz")
        n_atoms = sum(len(a) for a in frames)
        kinds = {k: sum(a.info["config_type"].endswith(k) for a in frames) for k in ("monomer", "pair")}
        fmax = max(np.abs(a.arrays["REF_forces"]).max() for a in frames)
        log(f"{name:<8} {len(frames):4d} configurations ({kinds['monomer']} monomers, "
            f"{kinds['pair']} pairs), {n_atoms} atoms, max |F| component {fmax:.2f} eV/Å")  # fmt: skip
    log(f"\n## failures and warnings ({len(failures)})")
    for msg in failures:
        log("  " + msg)
    log(f"\nwall time {time.time() - t0:.0f} s")
    (HERE / "base_molecules_generation_log.txt").write_text("\n".join(LOG) + "\n")


if __name__ == "__main__":
    main()
