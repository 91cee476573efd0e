"""Generate the leave-family-out test set: dimers of molecules and ions the main job never saw.

    python data/generate_leave_family_out.py   # ~5 min on 1 core; writes data/leave_family_out_*

The main job trains on the dimer families of ``data/dimers_train.xyz`` (11 H/C/N/O molecules
and ions, 3.5–8 Å). This script builds held-out families from new molecules, labelled with
the same method (GFN2-xTB via tblite) and the same geometry rules as ``generate_dimers.py``
(whose helpers it imports): hydronium H3O+ and guanidinium C(NH2)3+, nitrite NO2-, cyanate
OCN- and hydroxide OH-, hydrogen cyanide, acetonitrile and formamide. Every pair family has
at least one held-out molecule; some partners come from the training set (water,
tetramethylammonium, ammonium, formate, nitrate, bicarbonate).

Configurations where xTB moves charge between the fragments are set aside, as in
``generate_dimers.py``: a family is kept only if its fragment charges stay within 0.05 e of
the formal charges at 16, 12 and 9 Å (4 random orientations each, SCF converged), and each
test configuration is checked again.

Outputs (extxyz; energies eV, forces eV/Å, dipoles e·Å, charges e, lengths Å):
    data/leave_family_out_test.xyz      dimers at 9–15 Å (config types ion_pair, like_pair,
                                        ion_polar, polar_pair) plus like-charged dimers at
                                        exactly 15 Å (config_type like_15)
    data/leave_family_out_monomers.xyz  GFN2-xTB-optimised held-out monomers (isolated)
    data/leave_family_out_generation_log.txt  screen, rejected draws, statistics

Deterministic: fixed seeds (numpy.random.default_rng). See data/README.md.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import sys
import time
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.build import molecule
from ase.io import read, write
from ase.optimize import BFGS

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import generate_dimers as gd  # noqa: E402  (same geometry rules and reference method)

SEED_SCREEN, SEED_TEST, SEED_LIKE15 = 20, 21, 22
CHARGE_TOL = gd.CHARGE_TOL  # 0.05 e
SCREEN_R = (16.0, 12.0, 9.0)
SCREEN_ORIENTATIONS = 4
R_TEST = (9.0, 15.0)
COUNTS = {"ion_pair": 30, "like_pair": 30, "ion_polar": 30, "polar_pair": 15}
LIKE15_PER_FAMILY = 2

NEW = {
    "hydronium": 1, "guanidinium": 1, "nitrite": -1, "cyanate": -1, "hydroxide": -1,
    "hydrogen_cyanide": 0, "acetonitrile": 0, "formamide": 0,
}  # fmt: skip
PARTNERS = {
    "water": 0, "tetramethylammonium": 1, "ammonium": 1, "formate": -1, "nitrate": -1, "bicarbonate": -1,
}  # fmt: skip
FORMAL = {**NEW, **PARTNERS}

LOG: list[str] = []


def log(msg: str = "") -> None:
    print(msg, flush=True)
    LOG.append(msg)


def templates() -> dict[str, Atoms]:
    t = gd._tetrahedron()
    guan_pos, guan_sym = [[0.0, 0.0, 0.0]], ["C"]
    for k in range(3):
        u = np.array([np.cos(2 * np.pi * k / 3), np.sin(2 * np.pi * k / 3), 0.0])
        v = np.array([-u[1], u[0], 0.0])
        n = 1.33 * u
        guan_pos.append(n)
        guan_sym.append("N")
        for s in (1, -1):
            guan_pos.append(n + 1.01 * (0.5 * u + s * 0.866 * v))
            guan_sym.append("H")
    half = np.radians(115.0) / 2
    m = {
        "hydronium": Atoms("OH3", positions=np.vstack([[0, 0, 0], 0.98 * t[:3]])),
        "guanidinium": Atoms(guan_sym, positions=guan_pos),
        "nitrite": Atoms("NOO", positions=[[0, 0, 0], [1.25 * np.sin(half), 0, 1.25 * np.cos(half)],
                                          [-1.25 * np.sin(half), 0, 1.25 * np.cos(half)]]),
        "cyanate": Atoms("OCN", positions=[[0, 0, -1.26], [0, 0, 0], [0, 0, 1.20]]),
        "hydroxide": Atoms("OH", positions=[[0, 0, 0], [0, 0, 0.97]]),
        "hydrogen_cyanide": molecule("HCN"),
        "acetonitrile": molecule("CH3CN"),
        "formamide": Atoms("OCNHHH", positions=[[1.21, 0, 0], [0, 0, 0], [-0.70, 1.17, 0],
                                                 [-0.55, -0.95, 0], [-1.71, 1.17, 0], [-0.20, 2.06, 0]]),
    }  # fmt: skip
    return m


def monomers() -> dict[str, Atoms]:
    """Optimised held-out monomers plus the training partners from data/monomers.xyz."""
    out = {}
    for name, mol in templates().items():
        mol.calc = gd.xtb(FORMAL[name])
        BFGS(mol, logfile=None).run(fmax=0.005, steps=500)
        mol.positions -= mol.get_center_of_mass()
        out[name] = Atoms(mol.numbers, mol.positions)
    shipped = {a.info["name"]: a for a in read(HERE / "monomers.xyz", index=":")}
    for name in PARTNERS:
        out[name] = Atoms(shipped[name].numbers, shipped[name].positions)
    return out


def candidate_families() -> dict[str, list]:
    cat_new, an_new = ["hydronium", "guanidinium"], ["nitrite", "cyanate", "hydroxide"]
    pol_new = ["hydrogen_cyanide", "acetonitrile", "formamide"]
    fam = {"ion_pair": [], "like_pair": [], "ion_polar": [], "polar_pair": []}
    fam["ion_pair"] = [(c, a) for c in cat_new + ["tetramethylammonium"] for a in an_new]
    fam["ion_pair"] += [(c, a) for c in cat_new for a in ("nitrate", "bicarbonate")]
    for group in (cat_new, an_new):
        fam["like_pair"] += [(x, y) for i, x in enumerate(group) for y in group[i:]]
    fam["like_pair"] += [("hydronium", "ammonium"), ("guanidinium", "tetramethylammonium"),
                         ("nitrite", "formate"), ("cyanate", "nitrate")]  # fmt: skip
    fam["ion_polar"] = [(i, n) for i in cat_new + an_new for n in pol_new + ["water"]]
    fam["polar_pair"] = [(x, y) for i, x in enumerate(pol_new) for y in pol_new[i:]]
    fam["polar_pair"] += [(x, "water") for x in pol_new]
    return fam


def label(mono, a, b, r, rng, config_type):
    """A labelled dimer (or None, reason) with its largest fragment-charge deviation."""
    built = gd.make_dimer(mono, a, b, r, rng, gd.RATTLE_FRAGMENT)
    if built is None:
        return None, "clash"
    dimer, A, B = built
    qa, qb = FORMAL[a], FORMAL[b]
    ref, ra, rb = gd.single_point(dimer, qa + qb), gd.single_point(A, qa), gd.single_point(B, qb)
    if ref is None or ra is None or rb is None:
        return None, "scf"
    e, f, mu, q = ref
    frag = np.r_[np.zeros(len(A), int), np.ones(len(B), int)]
    q_a, q_b = q[frag == 0].sum(), q[frag == 1].sum()
    at = Atoms(dimer.numbers, dimer.positions, pbc=False)
    at.info.update(
        REF_energy=float(e), REF_dipole=np.asarray(mu, float), charge=int(qa + qb),
        config_type=config_type, separation=float(r), mol_A=a, mol_B=b,
        REF_energy_A=float(ra[0]), REF_energy_B=float(rb[0]),
        REF_binding_energy=float(e - ra[0] - rb[0]), REF_charge_A=float(q_a), REF_charge_B=float(q_b),
        charge_A=int(qa), charge_B=int(qb), held_out=int((a in NEW) + (b in NEW)),
    )  # fmt: skip
    at.arrays["fragment"] = frag
    at.arrays["formal_charges"] = gd.formal_charges(frag, (qa, qb))
    at.arrays["REF_forces"] = np.asarray(f, float)
    at.arrays["REF_charges"] = np.asarray(q, float)
    return (at, max(abs(q_a - qa), abs(q_b - qb))), "ok"


def screen(mono) -> dict[str, list]:
    rng = np.random.default_rng(SEED_SCREEN)
    kept = {}
    log(f"== charge-stability screen: r = {SCREEN_R} Å x {SCREEN_ORIENTATIONS} orientations, tolerance "
        f"{CHARGE_TOL} e (stop at first failure)")  # fmt: skip
    for ctype, fams in candidate_families().items():
        kept[ctype] = []
        for a, b in fams:
            worst, verdict = 0.0, "keep"
            for r in SCREEN_R:
                for _ in range(SCREEN_ORIENTATIONS):
                    res, status = label(mono, a, b, r, rng, ctype)
                    if res is None:
                        verdict = f"DISCARD ({status} at {r:g} Å)"
                        break
                    worst = max(worst, res[1])
                    if res[1] > CHARGE_TOL:
                        verdict = f"DISCARD (charge transfer at {r:g} Å)"
                        break
                if verdict != "keep":
                    break
            log(f"{ctype + ': ' + a + ' + ' + b:<44}{worst:>8.3f}  {verdict}")
            if verdict == "keep":
                kept[ctype].append((a, b))
    return kept


def build(mono, kept) -> list:
    frames = []
    for seed, counts, r_range in (
        (SEED_TEST, COUNTS, R_TEST),
        (SEED_LIKE15, {"like_15": LIKE15_PER_FAMILY * len(kept["like_pair"])}, (15.0, 15.0)),
    ):
        rng = np.random.default_rng(seed)
        for ctype, count in counts.items():
            fams = kept["like_pair" if ctype == "like_15" else ctype]
            made = rejected = 0
            while made < count and fams:
                a, b = fams[made % len(fams)]
                if rng.random() < 0.5:
                    a, b = b, a
                r = float(rng.uniform(*r_range))
                res, status = label(mono, a, b, r, rng, ctype)
                if res is None or res[1] > CHARGE_TOL:
                    rejected += 1
                    why = status if res is None else "charge transfer"
                    log(f"  rejected {ctype} {a}+{b} r={r:.2f} Å: {why}")
                    if rejected > 5 * count:
                        break
                    continue
                frames.append(res[0])
                made += 1
            log(f"  {ctype}: {made} configurations, {rejected} rejected draws")
    return frames


def summarise(frames) -> None:
    log("\n== test set")
    for ctype in dict.fromkeys(f.info["config_type"] for f in frames):
        sub = [f for f in frames if f.info["config_type"] == ctype]
        sep = np.array([f.info["separation"] for f in sub])
        eb = np.array([f.info["REF_binding_energy"] for f in sub])
        dq = np.array([max(abs(f.info["REF_charge_A"] - f.info["charge_A"]),
                           abs(f.info["REF_charge_B"] - f.info["charge_B"])) for f in sub])  # fmt: skip
        fams = {tuple(sorted((f.info["mol_A"], f.info["mol_B"]))) for f in sub}
        log(f"  {ctype:<11} n={len(sub):3d}  r {sep.min():5.2f}-{sep.max():5.2f} Å  "
            f"E_bind {eb.min():7.3f}..{eb.max():7.3f} eV  max|dq| {dq.max():.3f} e  "
            f"families {len(fams)}")  # fmt: skip


def main() -> None:
    from importlib.metadata import version

    t0 = time.time()
    log(f"# generate_leave_family_out.py  method={gd.METHOD}  tblite {version('tblite')}  "
        f"ase {version('ase')}  numpy {np.__version__}")  # fmt: skip
    mono = monomers()
    out = []
    log("\n== held-out monomers (GFN2-xTB optimised, BFGS fmax 0.005 eV/Å)")
    for name in NEW:
        m = mono[name]
        e, f, mu, q = gd.single_point(m, FORMAL[name])
        at = Atoms(m.numbers, m.positions, pbc=False)
        at.info.update(REF_energy=float(e), REF_dipole=np.asarray(mu, float), charge=FORMAL[name],
                       config_type="isolated_monomer", name=name)  # fmt: skip
        at.arrays["formal_charges"] = gd.formal_charges(np.zeros(len(m), int), (FORMAL[name],))
        at.arrays["REF_forces"] = np.asarray(f, float)
        at.arrays["REF_charges"] = np.asarray(q, float)
        out.append(at)
        log(f"  {name:<18} {at.get_chemical_formula():<8} q={FORMAL[name]:+d}  E={e:14.6f} eV  "
            f"sum q_xTB={q.sum():+.4f}")  # fmt: skip
    write(HERE / "leave_family_out_monomers.xyz", out, format="extxyz")
    kept = screen(mono)
    for ctype, fams in kept.items():
        log(f"kept {ctype}: {', '.join(a + '+' + b for a, b in fams)}")
    frames = build(mono, kept)
    summarise(frames)
    write(HERE / "leave_family_out_test.xyz", frames, format="extxyz")
    log(f"\n# total wall time {time.time() - t0:.1f} s")
    (HERE / "leave_family_out_generation_log.txt").write_text("\n".join(LOG) + "\n")


if __name__ == "__main__":
    main()
