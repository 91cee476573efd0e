"""Generate the reference dimer data sets for the mace-lr main job (GFN2-xTB via tblite).

    python data/generate_dimers.py            # writes data/*.xyz and data/generation_log.txt

Outputs (extxyz, energies eV, forces eV/Å, dipoles e·Å, charges e, lengths Å):
    data/monomers.xyz       GFN2-xTB-optimised isolated monomers (formal charges, reference energies)
    data/dimers_train.xyz   rattled monomers + dimers at centre-of-mass separation 3.5–8 Å
    data/dimers_valid.xyz   same distribution, independent seed
    data/dimers_test.xyz    dimers at 9–15 Å only (held-out separations beyond the training range)
    data/generation_log.txt charge-stability screen, -14.4/r check, per-split statistics

Everything is deterministic: fixed seeds, numpy.random.default_rng, a fixed list of molecule
families.  See data/README.md for the provenance and the meaning of each key.
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
from tblite.ase import TBLite

HERE = Path(__file__).resolve().parent
METHOD = "GFN2-xTB"
COULOMB = 14.399645  # e^2 / (4 pi eps0) in eV·Å

SEED_SCREEN, SEED_TRAIN, SEED_VALID, SEED_TEST = 0, 1, 2, 3
CHARGE_TOL = 0.05  # max |fragment charge - formal charge| (e) accepted at long range
CHECK_FROM = 6.0  # the per-configuration charge check applies from this separation (Å)
SCREEN_R = (16.0, 12.0, 9.0)  # family screen separations (Å), worst case first (1 Å beyond test)
SCREEN_ORIENTATIONS = 8
RATTLE_MONOMER = 0.05  # Å, Gaussian rattle of the "monomer" configurations
RATTLE_FRAGMENT = 0.02  # Å, Gaussian rattle of each fragment inside a dimer
MIN_DIST = 1.7  # Å, smallest allowed intermolecular atom-atom distance
MIN_DIST_HEAVY = 2.5  # Å, smallest allowed intermolecular heavy-atom distance

FORMAL_CHARGE = {
    "water": 0, "ammonia": 0, "formaldehyde": 0, "methanol": 0,
    "ammonium": 1, "methylammonium": 1, "tetramethylammonium": 1,
    "formate": -1, "acetate": -1, "nitrate": -1, "bicarbonate": -1,
}  # fmt: skip
NEUTRALS = [n for n, q in FORMAL_CHARGE.items() if q == 0]
CATIONS = [n for n, q in FORMAL_CHARGE.items() if q > 0]
ANIONS = [n for n, q in FORMAL_CHARGE.items() if q < 0]

# (config_type, number of configurations) per split
SPLITS = {
    "train": dict(seed=SEED_TRAIN, r=(3.5, 8.0),
                  counts={"monomer": 50, "ion_pair": 110, "ion_polar": 60, "polar_pair": 50,
                          "like_pair": 30}),
    "valid": dict(seed=SEED_VALID, r=(3.5, 8.0),
                  counts={"monomer": 6, "ion_pair": 14, "ion_polar": 8, "polar_pair": 7, "like_pair": 5}),
    "test": dict(seed=SEED_TEST, r=(9.0, 15.0),
                 counts={"ion_pair": 40, "ion_polar": 16, "polar_pair": 12, "like_pair": 12}),
}  # fmt: skip

LOG: list[str] = []


def log(msg: str = "") -> None:
    print(msg, flush=True)
    LOG.append(msg)


def xtb(charge: int) -> TBLite:
    return TBLite(method=METHOD, charge=int(charge), verbosity=0)


# ----------------------------------------------------------------------------- monomers
def _tetrahedron() -> np.ndarray:
    return np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]]) / np.sqrt(3)


def _lone_pair_h(mol: Atoms, symbol: str, bond: float) -> Atoms:
    """Protonate the first atom `symbol` of mol opposite to the sum of its bond vectors."""
    mol = mol.copy()
    i = mol.get_chemical_symbols().index(symbol)
    d = mol.get_distances(i, range(len(mol)))
    nb = [j for j in range(len(mol)) if j != i and d[j] < 1.6]
    v = -sum((mol.positions[j] - mol.positions[i]) / d[j] for j in nb)
    mol.append("H")
    mol.positions[-1] = mol.positions[i] + bond * v / np.linalg.norm(v)
    return mol


def monomer_templates() -> dict[str, Atoms]:
    t = _tetrahedron()
    m = {
        "water": molecule("H2O"),
        "ammonia": molecule("NH3"),
        "formaldehyde": molecule("H2CO"),
        "methanol": molecule("CH3OH"),
        "ammonium": Atoms("NH4", positions=np.vstack([[0, 0, 0], 1.03 * t])),
        "methylammonium": _lone_pair_h(molecule("H3CNH2"), "N", 1.03),
        "formate": Atoms("CHOO", positions=[[0, 0, 0], [0, 0, 1.10], [1.13, 0, -0.63], [-1.13, 0, -0.63]]),
        "nitrate": Atoms("NO3", positions=[[0, 0, 0]] + [
            [1.26 * np.cos(2 * np.pi * k / 3), 1.26 * np.sin(2 * np.pi * k / 3), 0] for k in range(3)]),
        "bicarbonate": Atoms("COOOH", positions=[[0, 0, 0], [1.25, 0, 0], [-0.62, 1.08, 0],
                                                 [-0.70, -1.20, 0], [0.20, -1.75, 0]]),
    }  # fmt: skip
    acetic = molecule("CH3COOH")
    d = acetic.get_all_distances()
    sym = acetic.get_chemical_symbols()
    oxy = [i for i, s in enumerate(sym) if s == "O"]
    del acetic[[i for i, s in enumerate(sym) if s == "H" and d[i, oxy].min() < 1.1][0]]
    m["acetate"] = acetic
    pos, sym = [[0.0, 0.0, 0.0]], ["N"]  # tetramethylammonium N(CH3)4+
    for v in t:
        c = 1.50 * v
        a = np.cross(v, [1, 0, 0] if abs(v[0]) < 0.9 else [0, 1, 0])
        a /= np.linalg.norm(a)
        b = np.cross(v, a)
        pos.append(c)
        sym.append("C")
        for k in range(3):
            ph, th = 2 * np.pi * k / 3, np.radians(70.5)
            pos.append(c + 1.09 * (np.cos(th) * v + np.sin(th) * (np.cos(ph) * a + np.sin(ph) * b)))
            sym.append("H")
    m["tetramethylammonium"] = Atoms(sym, positions=pos)
    return {name: m[name] for name in FORMAL_CHARGE}


def optimise_monomers() -> dict[str, Atoms]:
    out = {}
    for name, mol in monomer_templates().items():
        q = FORMAL_CHARGE[name]
        mol.calc = xtb(q)
        BFGS(mol, logfile=None).run(fmax=0.005, steps=500)
        mol.positions -= mol.get_center_of_mass()
        mol = Atoms(mol.numbers, mol.positions)
        out[name] = mol
    return out


# ----------------------------------------------------------------------------- geometry
def random_rotation(rng: np.random.Generator) -> np.ndarray:
    q = rng.normal(size=4)
    w, x, y, z = q / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])  # fmt: skip


def random_unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.normal(size=3)
    return v / np.linalg.norm(v)


def place(mol: Atoms, rng: np.random.Generator, rattle: float) -> Atoms:
    """Randomly rotated, rattled copy of mol with its centre of mass at the origin."""
    m = mol.copy()
    m.positions = m.positions @ random_rotation(rng).T
    if rattle > 0:
        m.positions += rng.normal(scale=rattle, size=m.positions.shape)
    m.positions -= m.get_center_of_mass()
    return m


def make_dimer(mono, a, b, r, rng, rattle, max_tries=200):
    """Dimer of a and b at centre-of-mass separation r (Å) without atomic clashes, or None."""
    for _ in range(max_tries):
        A, B = place(mono[a], rng, rattle), place(mono[b], rng, rattle)
        B.positions += r * random_unit(rng)
        d = np.linalg.norm(A.positions[:, None] - B.positions[None], axis=-1)
        heavy = (A.numbers[:, None] > 1) & (B.numbers[None] > 1)
        if d.min() >= MIN_DIST and (not heavy.any() or d[heavy].min() >= MIN_DIST_HEAVY):
            dimer = A + B
            com = dimer.get_center_of_mass()
            for x in (dimer, A, B):
                x.positions -= com  # dimer centre of mass at the origin (dipole origin)
            return dimer, A, B
    return None


# ----------------------------------------------------------------------------- reference
def single_point(atoms: Atoms, charge: int):
    """(energy, forces, dipole, charges) from GFN2-xTB, or None if the SCF fails."""
    at = atoms.copy()
    at.calc = xtb(charge)
    try:
        e = at.get_potential_energy()
        return e, at.get_forces(), at.get_dipole_moment(), at.get_charges()
    except Exception:  # tblite raises on non-converged SCF
        return None


def label_dimer(mono, a, b, r, rng, rattle, config_type):
    built = make_dimer(mono, a, b, r, rng, rattle)
    if built is None:
        return None, "clash"
    dimer, A, B = built
    qa, qb = FORMAL_CHARGE[a], FORMAL_CHARGE[b]
    ref = single_point(dimer, qa + qb)
    ra, rb = single_point(A, qa), single_point(B, qb)
    if ref is None or ra is None or rb is None:
        return None, "scf"
    e, f, mu, q = ref
    frag = np.r_[np.zeros(len(A), int), np.ones(len(B), int)]
    q_a, q_b = q[frag == 0].sum(), q[frag == 1].sum()
    dev = max(abs(q_a - qa), abs(q_b - qb))
    at = Atoms(dimer.numbers, dimer.positions, pbc=False)
    at.info.update(
        REF_energy=float(e), REF_dipole=np.asarray(mu, float), charge=int(qa + qb),
        config_type=config_type, separation=float(r), mol_A=a, mol_B=b,
        REF_energy_A=float(ra[0]), REF_energy_B=float(rb[0]),
        REF_binding_energy=float(e - ra[0] - rb[0]),
        REF_charge_A=float(q_a), REF_charge_B=float(q_b),
    )  # fmt: skip
    at.arrays["fragment"] = frag
    at.arrays["formal_charges"] = formal_charges(frag, (qa, qb))
    at.arrays["REF_forces"] = np.asarray(f, float)
    at.arrays["REF_charges"] = np.asarray(q, float)
    return (at, dev), "ok"


def formal_charges(fragment, charges) -> np.ndarray:
    """Per-atom formal charges: each fragment's formal charge on its first atom, zeros elsewhere
    (LES ``charge_groups="fragments"`` uses only their sum over each bonded fragment).
    """
    fragment = np.asarray(fragment)
    out = np.zeros(len(fragment))
    for f, q in enumerate(charges):
        out[np.flatnonzero(fragment == f)[0]] = q
    return out


def label_monomer(mono, name, rng, rattle):
    m = place(mono[name], rng, rattle)
    q = FORMAL_CHARGE[name]
    ref = single_point(m, q)
    if ref is None:
        return None
    e, f, mu, ch = ref
    at = Atoms(m.numbers, m.positions, pbc=False)
    at.info.update(
        REF_energy=float(e), REF_dipole=np.asarray(mu, float), charge=int(q),
        config_type="monomer", separation=0.0, mol_A=name, mol_B="none",
        REF_energy_A=float(e), REF_energy_B=0.0, REF_binding_energy=0.0,
        REF_charge_A=float(ch.sum()), REF_charge_B=0.0,
    )  # fmt: skip
    at.arrays["fragment"] = np.zeros(len(m), int)
    at.arrays["formal_charges"] = formal_charges(at.arrays["fragment"], (q,))
    at.arrays["REF_forces"] = np.asarray(f, float)
    at.arrays["REF_charges"] = np.asarray(ch, float)
    return at


# ----------------------------------------------------------------------------- families
def candidate_families():
    fam = {"ion_pair": [], "ion_polar": [], "polar_pair": [], "like_pair": []}
    fam["ion_pair"] = [(c, a) for c in CATIONS for a in ANIONS]
    fam["ion_polar"] = [(i, n) for i in CATIONS + ANIONS for n in NEUTRALS]
    fam["polar_pair"] = [(n, m) for i, n in enumerate(NEUTRALS) for m in NEUTRALS[i:]]
    for group in (CATIONS, ANIONS):
        fam["like_pair"] += [(x, y) for i, x in enumerate(group) for y in group[i:]]
    return fam


def screen_families(mono):
    """Keep a family only if xTB keeps formal fragment charges at 9–15 Å (and the SCF converges)."""
    rng = np.random.default_rng(SEED_SCREEN)
    kept = {}
    log(f"== charge-stability screen: r = {SCREEN_R} Å x {SCREEN_ORIENTATIONS} orientations, "
        f"tolerance {CHARGE_TOL} e (rattled as the data; worst separation first, "
        "stop at first failure)")  # fmt: skip
    log(f"{'family':<38}{'max|dq| (e)':>12}  verdict")
    for ctype, fams in candidate_families().items():
        kept[ctype] = []
        for a, b in fams:
            worst, verdict = 0.0, "keep"
            for r in SCREEN_R:
                for _ in range(SCREEN_ORIENTATIONS):
                    res, status = label_dimer(mono, a, b, r, rng, RATTLE_FRAGMENT, ctype)
                    if res is None:
                        verdict = f"DISCARD ({status} at {r:g} Å)"
                        break
                    worst = max(worst, res[1])
                    if res[1] > CHARGE_TOL:
                        verdict = f"DISCARD (charge transfer at {r:g} Å)"
                        break
                if verdict != "keep":
                    break
            log(f"{ctype + ': ' + a + ' + ' + b:<38}{worst:>12.3f}  {verdict}")
            if verdict == "keep":
                kept[ctype].append((a, b))
    return kept


def coulomb_check(mono, kept):
    """Binding energy of each ion pair along one fixed random orientation vs -14.4/r.

    The kept ion pairs are checked, plus the first discarded one for contrast. No clash check:
    at 4 Å a random orientation may put atoms on top of each other.
    """
    pairs = [(p, "kept") for p in kept["ion_pair"]]
    pairs += [(p, "discarded") for p in candidate_families()["ion_pair"] if p not in kept["ion_pair"]][:1]
    rng = np.random.default_rng(SEED_SCREEN + 100)
    log(
        "\n== ion-pair binding energy E(AB) - E(A) - E(B) vs point-charge Coulomb -14.40/r, "
        "one fixed random orientation per pair, rigid optimised monomers"
    )
    log(
        f"{'pair':<34}{'r (Å)':>6} {'E_bind xTB':>11} {'-14.40/r':>9} {'diff':>8} {'ratio':>6} "
        f"{'q_A':>7} {'q_B':>7}"
    )
    table = {}
    for (a, b), status in pairs:
        A0, B0 = place(mono[a], rng, 0.0), place(mono[b], rng, 0.0)
        n = random_unit(rng)
        ea = single_point(A0, FORMAL_CHARGE[a])[0]
        rows = []
        for r in (4.0, 5.0, 6.0, 8.0, 10.0, 12.0, 15.0, 20.0):
            B = B0.copy()
            B.positions += r * n
            ref = single_point(A0 + B, FORMAL_CHARGE[a] + FORMAL_CHARGE[b])
            label = f"{a}+{b} ({status})"
            if ref is None:
                log(f"{label:<34}{r:6.1f}   SCF not converged")
                continue
            e, _, _, q = ref
            eb = e - ea - single_point(B, FORMAL_CHARGE[b])[0]
            c = -COULOMB / r
            rows.append((r, eb, c, q[: len(A0)].sum(), q[len(A0) :].sum()))
            log(f"{label:<34}{r:6.1f} {eb:11.4f} {c:9.4f} {eb - c:8.4f} {eb / c:6.3f} "
                f"{q[: len(A0)].sum():7.3f} {q[len(A0) :].sum():7.3f}")  # fmt: skip
        table[(a, b)] = rows
    return table


# ----------------------------------------------------------------------------- splits
def build_split(name, spec, mono, kept):
    rng = np.random.default_rng(spec["seed"])
    rmin, rmax = spec["r"]
    frames, rejected = [], {"clash": 0, "scf": 0, "charge": 0}
    names = list(FORMAL_CHARGE)
    for ctype, count in spec["counts"].items():
        made = 0
        while made < count:
            if ctype == "monomer":
                at = label_monomer(mono, names[made % len(names)], rng, RATTLE_MONOMER)
                if at is None:
                    rejected["scf"] += 1
                    continue
                frames.append(at)
                made += 1
                continue
            fams = kept[ctype]
            a, b = fams[made % len(fams)]  # round robin over the kept families
            if rng.random() < 0.5:
                a, b = b, a
            r = float(rng.uniform(rmin, rmax))
            res, status = label_dimer(mono, a, b, r, rng, RATTLE_FRAGMENT, ctype)
            if res is None:
                rejected[status] += 1
                log(f"  [{name}] rejected draw {a}+{b} r={r:.2f} Å: {status}")
                continue
            at, dev = res
            if r >= CHECK_FROM and dev > CHARGE_TOL:
                rejected["charge"] += 1
                log(f"  [{name}] rejected draw {a}+{b} r={r:.2f} Å: fragment charge off by {dev:.3f} e")
                continue
            frames.append(at)
            made += 1
    return frames, rejected


def summarise(name, frames, rejected):
    log(f"\n== {name}: {len(frames)} configurations, rejected draws {rejected}")
    for ctype in dict.fromkeys(f.info["config_type"] for f in frames):
        sub = [f for f in frames if f.info["config_type"] == ctype]
        sep = np.array([f.info["separation"] for f in sub])
        eb = np.array([f.info["REF_binding_energy"] for f in sub])
        dq = np.array([max(abs(f.info["REF_charge_A"] - FORMAL_CHARGE[f.info["mol_A"]]),
                           abs(f.info["REF_charge_B"] - (FORMAL_CHARGE.get(f.info["mol_B"], 0))))
                       for f in sub])  # fmt: skip
        nat = np.array([len(f) for f in sub])
        log(f"  {ctype:<11} n={len(sub):4d}  atoms {nat.min()}-{nat.max()}  "
            f"r {sep.min():5.2f}-{sep.max():5.2f} Å"
            f"  E_bind {eb.min():7.3f}..{eb.max():7.3f} eV  max|dq| {dq.max():.3f} e")  # fmt: skip


def main():
    from importlib.metadata import version

    t0 = time.time()
    log(f"# generate_dimers.py  method={METHOD}  tblite {version('tblite')}  ase {version('ase')}  "
        f"numpy {np.__version__}")  # fmt: skip
    mono = optimise_monomers()
    mono_frames = []
    log("\n== isolated monomers (GFN2-xTB optimised, BFGS fmax 0.005 eV/Å)")
    for name, m in mono.items():
        e, f, mu, q = single_point(m, FORMAL_CHARGE[name])
        at = Atoms(m.numbers, m.positions, pbc=False)
        at.info.update(REF_energy=float(e), REF_dipole=np.asarray(mu, float), charge=FORMAL_CHARGE[name],
                       config_type="isolated_monomer", name=name)  # fmt: skip
        at.arrays["formal_charges"] = formal_charges(np.zeros(len(m), int), (FORMAL_CHARGE[name],))
        at.arrays["REF_forces"] = np.asarray(f, float)
        at.arrays["REF_charges"] = np.asarray(q, float)
        mono_frames.append(at)
        log(f"  {name:<20} {at.get_chemical_formula():<8} q={FORMAL_CHARGE[name]:+d}  E={e:14.6f} eV  "
            f"|F|max={np.abs(f).max():.4f} eV/Å")  # fmt: skip
    write(HERE / "monomers.xyz", mono_frames, format="extxyz")

    kept = screen_families(mono)
    for ctype, fams in kept.items():
        log(f"kept {ctype}: {', '.join(a + '+' + b for a, b in fams)}")
    coulomb_check(mono, kept)

    for name, spec in SPLITS.items():
        frames, rejected = build_split(name, spec, mono, kept)
        summarise(name, frames, rejected)
        write(HERE / f"dimers_{name}.xyz", frames, format="extxyz")
    log(f"\n# total wall time {time.time() - t0:.1f} s")
    (HERE / "generation_log.txt").write_text("\n".join(LOG) + "\n")


if __name__ == "__main__":
    main()
