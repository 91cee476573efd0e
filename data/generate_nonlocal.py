"""Generate the nonlocal-coupling data set: end-substituted C14 polyynes in 2 x 2 quartets.

    python data/generate_nonlocal.py   # writes data/nonlocal_*.xyz and data/nonlocal_generation_log.txt

Every random draw gives one *quartet*: a distorted C14 backbone shared exactly by four
molecules that differ only in their end groups,

    X-C14-Y,  X in {H-, H2C= (protonated, charge +1)},  Y in {-H, -NH2}.

The backbone is long enough that no atom has both an X-group atom and a Y-group atom in its
two-hop receptive field (two hops of r_max = 4.5 Å, the base model's cutoff and number of
interactions); every configuration is checked. So any model whose energy is a sum of
per-atom terms that see 2 x 4.5 Å is exactly additive across a quartet,
E(X, Y) = A(X) + B(Y), while the GFN2-xTB energy is not: the far-end amine stabilises the
protonated chain by conjugation (push-pull). The non-additivity
ΔΔE = E(H2C, NH2) - E(H2C, H) - E(H, NH2) + E(H, H) is what a nonlocal block must read
from one end at the other; a purely additive model has a held-out RMSE of at least
rms(ΔΔE)/4 (log).

Outputs (extxyz; energies eV, forces eV/Å, dipoles e·Å, charges e, lengths Å):
    data/nonlocal_train.xyz   160 configurations (40 quartets), seed 21
    data/nonlocal_valid.xyz    24 configurations  (6 quartets), seed 22
    data/nonlocal_test.xyz     60 configurations (15 quartets), seed 23
    data/nonlocal_generation_log.txt  minima, checks and statistics

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
N_CARBON = 14
R_MAX = 4.5  # Å, cutoff of data/base_mace.model (2 interactions)
SPLITS = {"train": (21, 40), "valid": (22, 6), "test": (23, 15)}  # name: (seed, number of quartets)
X_GROUPS = ("H", "CH2+")  # at C1
Y_GROUPS = ("H", "NH2")  # at C14
SIGMA_RATTLE = 0.015  # Å, Gaussian rattle of every backbone Cartesian component (times the scale)
SIGMA_BOW = 0.3  # Å, amplitude of a smooth transverse bow of the backbone (times the scale)
SIGMA_END = 0.02  # Å, rattle of the end-group atoms (times the scale)

LOG: list[str] = []


def log(msg: str = "") -> None:
    print(msg, flush=True)
    LOG.append(msg)


def calculator(charge: int) -> TBLite:
    return TBLite(method=METHOD, charge=int(charge), verbosity=0)


def template(x: str, y: str, bonds: np.ndarray | None = None, ends: dict | None = None) -> Atoms:
    """Straight chain along z: C1..C14, then the X-group hydrogens (on C1), then the Y group (on C14)."""
    if bonds is None:
        bonds = np.array([1.21 if k % 2 == 0 else 1.34 for k in range(N_CARBON - 1)])
    e = {"ch": 1.06, "ch2": 1.08, "hcc": 122.0, "cn": 1.33, "nh": 1.01, "hnc": 120.0}
    e.update(ends or {})
    z = np.concatenate([[0.0], np.cumsum(bonds)])
    symbols = ["C"] * N_CARBON
    pos = [[0.0, 0.0, zz] for zz in z]
    if x == "H":
        symbols += ["H"]
        pos += [[0.0, 0.0, -e["ch"]]]
    else:
        b = np.radians(180.0 - e["hcc"])
        symbols += ["H", "H"]
        pos += [[s * e["ch2"] * np.sin(b), 0.0, -e["ch2"] * np.cos(b)] for s in (1.0, -1.0)]
    if y == "H":
        symbols += ["H"]
        pos += [[0.0, 0.0, z[-1] + e["ch"]]]
    else:
        zn = z[-1] + e["cn"]
        b = np.radians(180.0 - e["hnc"])
        symbols += ["N", "H", "H"]
        pos += [[0.0, 0.0, zn]]
        pos += [[s * e["nh"] * np.sin(b), 0.0, zn + e["nh"] * np.cos(b)] for s in (1.0, -1.0)]
    return Atoms(symbols, positions=pos)


def charge_of(x: str) -> int:
    return 1 if x == "CH2+" else 0


def optimise() -> dict:
    """GFN2-xTB minima (planar start) of the four species; backbone bonds and end-group geometry."""
    ref = {}
    for x in X_GROUPS:
        for y in Y_GROUPS:
            mol = template(x, y)
            mol.calc = calculator(charge_of(x))
            BFGS(mol, logfile=None).run(fmax=0.005, steps=400)
            p = mol.positions
            ref[x, y] = {
                "energy": float(mol.get_potential_energy()),
                "fmax": float(np.abs(mol.get_forces()).max()),
                "bonds": np.linalg.norm(np.diff(p[:N_CARBON], axis=0), axis=1),
                "positions": p.copy(),
            }
    return ref


def end_parameters(ref: dict) -> dict:
    """Mean end-group bond lengths and angles of the minima (used for every sampled geometry)."""

    def ang(a, b, c):
        u, w = a - b, c - b
        return float(np.degrees(np.arccos(u @ w / np.linalg.norm(u) / np.linalg.norm(w))))

    n = N_CARBON
    p_h = ref["CH2+", "H"]["positions"]
    p_n = ref["H", "NH2"]["positions"]
    p_hh = ref["H", "H"]["positions"]
    return {
        "ch": float(np.linalg.norm(p_hh[n] - p_hh[0])),
        "ch2": float(np.linalg.norm(p_h[n] - p_h[0])),
        "hcc": ang(p_h[n], p_h[0], p_h[1]),
        "cn": float(np.linalg.norm(p_n[n + 1] - p_n[n - 1])),
        "nh": float(np.linalg.norm(p_n[n + 2] - p_n[n + 1])),
        "hnc": ang(p_n[n + 2], p_n[n + 1], p_n[n - 1]),
    }


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q * np.linalg.det(q)


def quartet(rng: np.random.Generator, bonds: np.ndarray, ends: dict) -> tuple[list[Atoms], float]:
    """Four molecules on one shared distorted backbone (identical C1..C14 coordinates)."""
    scale = rng.uniform(0.5, 1.5)
    rattle = rng.normal(scale=SIGMA_RATTLE * scale, size=(N_CARBON, 3))
    bow = rng.normal(scale=SIGMA_BOW * scale, size=2)
    end_rattle = rng.normal(scale=SIGMA_END * scale, size=(5, 3))
    azimuth = rng.uniform(0.0, 2 * np.pi)
    rot = random_rotation(rng)
    z = np.concatenate([[0.0], np.cumsum(bonds)])
    s = np.sin(np.pi * z / z[-1])
    c, sn = np.cos(azimuth), np.sin(azimuth)
    rz = np.array([[c, -sn, 0.0], [sn, c, 0.0], [0.0, 0.0, 1.0]])
    out = []
    for x in X_GROUPS:
        for y in Y_GROUPS:
            at = template(x, y, bonds, ends)
            p = at.positions
            p[N_CARBON:] = p[N_CARBON:] @ rz.T  # random orientation of the end-group planes
            nx = 1 + (x != "H")
            p[N_CARBON : N_CARBON + nx] += end_rattle[:nx]  # same X-group rattle whatever Y is
            p[N_CARBON + nx :] += end_rattle[2 : 2 + len(p) - N_CARBON - nx]  # and vice versa
            p[:N_CARBON] += rattle
            p[:, 0] += bow[0] * np.interp(p[:, 2], z, s)
            p[:, 1] += bow[1] * np.interp(p[:, 2], z, s)
            at.positions = p @ rot.T
            groups = [0] * N_CARBON + [1] * (1 + (x != "H")) + [2] * (1 + 2 * (y != "H"))
            at.arrays["group"] = np.array(groups)
            at.info.update(x_group=x, y_group=y, charge=charge_of(x))
            out.append(at)
    return out, scale


def reach(atoms: Atoms, centres: np.ndarray) -> np.ndarray:
    adj = atoms.get_all_distances() < R_MAX
    one = adj[centres].any(0)
    return adj[one].any(0)


def separated(atoms: Atoms) -> bool:
    """True when no atom has an X-group atom and a Y-group atom in its two-hop receptive field."""
    g = atoms.arrays["group"]
    return not (reach(atoms, np.flatnonzero(g == 1)) & reach(atoms, np.flatnonzero(g == 2))).any()


def label(atoms: Atoms, quartet_id: int, scale: float) -> Atoms | None:
    at = atoms.copy()
    at.calc = calculator(atoms.info["charge"])
    try:
        e = at.get_potential_energy()
        f, mu, q = at.get_forces(), at.get_dipole_moment(), at.get_charges()
    except Exception:  # tblite raises on a non-converged SCF
        return None
    out = Atoms(atoms.numbers, atoms.positions - atoms.get_center_of_mass(), pbc=False)
    out.info.update(
        REF_energy=float(e), REF_dipole=np.asarray(mu, float), charge=int(atoms.info["charge"]),
        config_type=f"{atoms.info['x_group']}|{atoms.info['y_group']}", quartet=int(quartet_id),
        distortion=float(round(scale, 4)),
    )  # fmt: skip
    out.arrays["group"] = atoms.arrays["group"]
    out.arrays["REF_forces"] = np.asarray(f, float)
    out.arrays["REF_charges"] = np.asarray(q, float)
    return out


def build_split(seed: int, n: int, bonds: np.ndarray, ends: dict) -> tuple[list[Atoms], dict]:
    rng = np.random.default_rng(seed)
    frames: list[Atoms] = []
    rejected = {"receptive_field": 0, "scf": 0}
    k = 0
    while k < n:
        members, scale = quartet(rng, bonds, ends)
        if not all(separated(m) for m in members):
            rejected["receptive_field"] += 1
            continue
        labelled = [label(m, k, scale) for m in members]
        if any(m is None for m in labelled):
            rejected["scf"] += 1
            continue
        frames += labelled
        k += 1
    return frames, rejected


def ddE(frames: list[Atoms]) -> np.ndarray:
    """Non-additivity E(CH2+,NH2) - E(CH2+,H) - E(H,NH2) + E(H,H) per quartet (eV)."""
    e = {(f.info["quartet"], f.info["config_type"]): f.info["REF_energy"] for f in frames}
    qs = sorted({f.info["quartet"] for f in frames})
    return np.array([e[q, "CH2+|NH2"] - e[q, "CH2+|H"] - e[q, "H|NH2"] + e[q, "H|H"] for q in qs])


def main() -> None:
    from importlib.metadata import version

    t0 = time.time()
    log(f"# generate_nonlocal.py  method={METHOD}  tblite {version('tblite')}  ase {version('ase')}  "
        f"numpy {np.__version__}  OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")  # fmt: skip
    ref = optimise()
    log("\n== GFN2-xTB minima (BFGS from a planar straight chain, fmax 0.005 eV/Å)")
    for (x, y), r in ref.items():
        log(f"  {x:>4} | C{N_CARBON} | {y:<3}  charge {charge_of(x):+d}  E = {r['energy']:.6f} eV  "
            f"|F|max {r['fmax']:.4f} eV/Å")  # fmt: skip
        log(f"    C-C bonds (Å): {' '.join(f'{b:.4f}' for b in r['bonds'])}")
    e = {k: r["energy"] for k, r in ref.items()}
    dd = e["CH2+", "NH2"] - e["CH2+", "H"] - e["H", "NH2"] + e["H", "H"]
    log(f"  minima: non-additivity ddE = {dd:+.4f} eV (own relaxed geometries)")
    bonds = np.mean([r["bonds"] for r in ref.values()], axis=0)
    ends = end_parameters(ref)
    log("  shared backbone: mean bonds of the four minima; end groups: "
        + ", ".join(f"{k} {v:.3f}" for k, v in ends.items()))  # fmt: skip
    log(f"  distortions (times a per-quartet factor U(0.5, 1.5)): backbone rattle {SIGMA_RATTLE} Å, "
        f"transverse bow {SIGMA_BOW} Å, end-group rattle {SIGMA_END} Å; random end-plane azimuth and "
        "overall rotation")  # fmt: skip
    for name, (seed, n) in SPLITS.items():
        frames, rejected = build_split(seed, n, bonds, ends)
        d = ddE(frames)
        en = np.array([f.info["REF_energy"] for f in frames])
        fo = np.concatenate([f.arrays["REF_forces"] for f in frames])
        log(f"\n== {name}: seed {seed}, {len(frames)} configurations ({n} quartets), "
            f"rejected draws {rejected}")  # fmt: skip
        log(f"  E {en.min():.4f} .. {en.max():.4f} eV; |F| rms {np.sqrt((fo**2).mean()):.3f} eV/Å, "
            f"max {np.abs(fo).max():.3f} eV/Å")  # fmt: skip
        log(f"  ddE per quartet: mean {d.mean():+.4f} eV, std {d.std():.4f} eV, min {d.min():+.4f}, "
            f"max {d.max():+.4f}")  # fmt: skip
        log(f"  lower bound for an additive (2 x {R_MAX} Å receptive field) model: energy RMSE >= "
            f"rms(ddE)/4 = {1000 * np.sqrt(np.mean(d**2)) / 4:.1f} meV")  # fmt: skip
        write(HERE / f"nonlocal_{name}.xyz", frames, format="extxyz")
    log(f"\n# total wall time {time.time() - t0:.1f} s")
    (HERE / "nonlocal_generation_log.txt").write_text("\n".join(LOG) + "\n")


if __name__ == "__main__":
    main()
