"""Generate the nonlocal charge-transfer data set: polyyne C10H2 and its protonated form C10H3+.

    python data/generate_charge_transfer.py   # writes data/chain_*.xyz and data/chain_generation_log.txt

The test case follows the 4G-HDNNP paper of Ko et al. (Nat. Commun. 12, 398 (2021)): adding a
proton at one end of a conjugated carbon chain changes the charges at the other end, more than
2 x 4.5 Å away, where the local environment of the two molecules is the same. A model whose
charges come from local features (LES) must give both molecules the same charges there; a
model that equilibrates the charges globally under the total-charge constraint (QEq) need not.

Configurations come in pairs built from one random draw: a neutral H-C10-H and a protonated
H2C-C9-H (charge +1) whose atoms C2..C10 and the far hydrogen have *identical* coordinates
(up to the common translation that puts each centre of mass at the origin). Only C1 and the
hydrogen(s) on it differ. Each pair is a random distortion of the GFN2-xTB minimum: bond
stretches, bends, CH2 orientation and a small rattle. Every configuration is checked so that
C1 and its hydrogens lie outside the two-layer receptive field (two hops of 4.5 Å) of the
far-end atoms C8, C9, C10 and H11.

Outputs (extxyz; energies eV, forces eV/Å, dipoles e·Å, charges e, lengths Å):
    data/chain_train.xyz   200 configurations (100 pairs), seed 11
    data/chain_valid.xyz    30 configurations (15 pairs), seed 12
    data/chain_test.xyz     60 configurations (30 pairs), seed 13 (independent)
    data/chain_generation_log.txt  reference geometries, checks and statistics

Everything is deterministic: fixed seeds, numpy.random.default_rng. See data/README.md.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny molecules: threads only add overhead

import time
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.io import write
from ase.optimize import BFGS
from tblite.ase import TBLite

HERE = Path(__file__).resolve().parent
METHOD = "GFN2-xTB"
N_CARBON = 10
R_MAX = 4.5  # Å, cutoff of data/base_mace.model (2 interactions: receptive field 2 x 4.5 Å)
FAR_CARBONS = (8, 9, 10)  # chain positions of the far-end carbons (C1 carries the extra proton)

SPLITS = {"train": (11, 100), "valid": (12, 15), "test": (13, 30)}  # name: (seed, number of pairs)

# distortion amplitudes (one draw per pair; scaled by a per-pair factor drawn from U(0.5, 1.5))
SIGMA_CC = 0.02  # Å, C-C bond stretch
SIGMA_CH = 0.02  # Å, C-H bond stretch
SIGMA_BEND = 5.0  # degrees, each of the two components of the bend at every chain atom
SIGMA_HCC = 4.0  # degrees, H-C1-C2 angle of the CH2 group
SIGMA_RATTLE = 0.01  # Å, Gaussian rattle of every Cartesian component
MIN_FAR_DISTANCE = 9.0  # Å, smallest allowed distance from a C1 hydrogen to a far-end atom

LOG: list[str] = []


def log(msg: str = "") -> None:
    print(msg, flush=True)
    LOG.append(msg)


def xtb(charge: int) -> TBLite:
    return TBLite(method=METHOD, charge=int(charge), verbosity=0)


# ----------------------------------------------------------------------------- reference minima
def linear_template(protonated: bool) -> Atoms:
    """Straight chain along z: C1..C10, the far H (on C10), then the H(s) on C1."""
    bonds = [1.22 if k % 2 == 0 else 1.35 for k in range(N_CARBON - 1)]
    z = np.concatenate([[0.0], np.cumsum(bonds)])
    pos = [[0.0, 0.0, zz] for zz in z] + [[0.0, 0.0, z[-1] + 1.06]]
    if protonated:
        pos += [[0.93, 0.0, -0.54], [-0.93, 0.0, -0.54]]
    else:
        pos += [[0.0, 0.0, -1.06]]
    return Atoms("C10H3" if protonated else "C10H2", positions=pos)


def angle(u: np.ndarray, w: np.ndarray) -> float:
    return float(np.degrees(np.arccos(np.clip(u @ w / np.linalg.norm(u) / np.linalg.norm(w), -1, 1))))


def optimise() -> dict:
    """GFN2-xTB minima of both states and their internal coordinates."""
    ref = {}
    for protonated in (False, True):
        mol = linear_template(protonated)
        mol.calc = xtb(int(protonated))
        BFGS(mol, logfile=None).run(fmax=0.002, steps=500)
        p = mol.positions
        ref[protonated] = {
            "atoms": mol,
            "energy": float(mol.get_potential_energy()),
            "charges": mol.get_charges().copy(),
            "bonds": np.linalg.norm(np.diff(p[:N_CARBON], axis=0), axis=1),
            "ch_far": float(np.linalg.norm(p[N_CARBON] - p[N_CARBON - 1])),
            "ch_near": float(np.linalg.norm(p[N_CARBON + 1] - p[0])),
            "hcc": angle(p[N_CARBON + 1] - p[0], p[1] - p[0]) if protonated else 180.0,
            "fmax": float(np.abs(mol.get_forces()).max()),
        }
    return ref


# ----------------------------------------------------------------------------- geometry
def perpendicular_basis(d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    helper = np.array([1.0, 0.0, 0.0]) if abs(d[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    e1 = np.cross(d, helper)
    e1 /= np.linalg.norm(e1)
    return e1, np.cross(d, e1)


def bend(d: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Turn the unit vector d by |theta| (radians) towards theta[0] e1 + theta[1] e2."""
    size = float(np.linalg.norm(theta))
    if size == 0.0:
        return d
    e1, e2 = perpendicular_basis(d)
    u = (theta[0] * e1 + theta[1] * e2) / size
    return np.cos(size) * d + np.sin(size) * u


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    q = rng.normal(size=4)
    w, x, y, z = q / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])  # fmt: skip


def draw(rng: np.random.Generator) -> dict:
    """All random numbers of one pair (shared by its neutral and protonated member)."""
    scale = rng.uniform(0.5, 1.5)
    return {
        "scale": scale,
        "d_cc": rng.normal(scale=SIGMA_CC * scale, size=N_CARBON - 1),  # bond k: C_k-C_k+1
        "d_ch": rng.normal(scale=SIGMA_CH * scale, size=3),  # far CH, near CH (x2)
        "bends": np.radians(rng.normal(scale=SIGMA_BEND * scale, size=(N_CARBON, 2))),  # at C10..C1
        "d_hcc": rng.normal(scale=SIGMA_HCC * scale, size=2),
        "azimuth": rng.uniform(0.0, 2 * np.pi),
        "rattle": rng.normal(scale=SIGMA_RATTLE * scale, size=(N_CARBON + 3, 3)),
        "rotation": random_rotation(rng),
    }


def build(ref: dict, r: dict, protonated: bool) -> Atoms:
    """Configuration of one state from the pair's random numbers.

    The chain is grown from the far hydrogen towards C1. Bonds C2-C3 ... C9-C10 and the far
    C-H use the mean of the two minima, so C2..C10 and H11 sit at the same place in both
    states; only C1 (bond C1-C2 of its own state) and the hydrogen(s) on C1 differ.
    """
    own = ref[protonated]
    shared_bonds = 0.5 * (ref[False]["bonds"] + ref[True]["bonds"]) + r["d_cc"]
    ch_far = 0.5 * (ref[False]["ch_far"] + ref[True]["ch_far"]) + r["d_ch"][0]
    pos = np.zeros((N_CARBON + 1, 3))  # index 0..9: C1..C10, index 10: far H
    d = np.array([0.0, 0.0, -1.0])  # direction from the far H towards C1
    pos[N_CARBON - 1] = pos[N_CARBON] + ch_far * d
    for k in range(N_CARBON - 1, 0, -1):  # from C_{k+1} (index k) to C_k (index k - 1)
        d = bend(d, r["bends"][N_CARBON - 1 - k])
        length = own["bonds"][k - 1] + r["d_cc"][k - 1] if k == 1 else shared_bonds[k - 1]
        pos[k - 1] = pos[k] + length * d
    axis = bend(d, r["bends"][N_CARBON - 1])  # C2 -> C1 direction, bent at C1
    if protonated:
        e1, e2 = perpendicular_basis(axis)
        w = np.cos(r["azimuth"]) * e1 + np.sin(r["azimuth"]) * e2
        hs = []
        for j, sign in enumerate((1.0, -1.0)):
            beta = np.radians(180.0 - own["hcc"] + r["d_hcc"][j])
            direction = np.cos(beta) * axis + sign * np.sin(beta) * w
            hs.append(pos[0] + (own["ch_near"] + r["d_ch"][1 + j]) * direction)
        pos = np.vstack([pos, hs])
    else:
        pos = np.vstack([pos, pos[0] + (own["ch_near"] + r["d_ch"][1]) * axis])
    pos = pos + r["rattle"][: len(pos)]
    pos = pos @ r["rotation"].T
    atoms = Atoms("C10H3" if protonated else "C10H2", positions=pos, pbc=False)
    atoms.positions -= atoms.get_center_of_mass()  # dipole origin, as in the dimer data
    # chain position: C_k -> k, far H -> 11, H(s) on C1 -> 0
    atoms.arrays["site"] = np.array(list(range(1, N_CARBON + 1)) + [N_CARBON + 1] + [0] * (len(atoms) - 11))
    return atoms


def receptive_field(atoms: Atoms, centres: np.ndarray) -> set:
    """Atoms within two hops of r_max of any of `centres` (the base model's receptive field)."""
    d = atoms.get_all_distances()
    adj = d < R_MAX
    one = adj[centres].any(0)
    two = adj[one].any(0)
    return set(np.flatnonzero(two).tolist())


# ----------------------------------------------------------------------------- reference labels
def label(atoms: Atoms, protonated: bool, pair: int, scale: float) -> Atoms | None:
    at = atoms.copy()
    at.calc = xtb(int(protonated))
    try:
        e = at.get_potential_energy()
        f, mu, q = at.get_forces(), at.get_dipole_moment(), at.get_charges()
    except Exception:  # tblite raises on a non-converged SCF
        return None
    out = Atoms(atoms.numbers, atoms.positions, pbc=False)
    out.info.update(
        REF_energy=float(e), REF_dipole=np.asarray(mu, float), charge=int(protonated),
        config_type="protonated" if protonated else "neutral", pair=int(pair),
        distortion=float(round(scale, 4)),
    )  # fmt: skip
    out.arrays["site"] = atoms.arrays["site"]
    out.arrays["REF_forces"] = np.asarray(f, float)
    out.arrays["REF_charges"] = np.asarray(q, float)
    return out


def build_split(name: str, seed: int, n_pairs: int, ref: dict) -> tuple[list, dict]:
    rng = np.random.default_rng(seed)
    frames: list[Atoms] = []
    rejected = {"too_close": 0, "receptive_field": 0, "scf": 0}
    stats: dict[str, list] = {"min_dist": [], "shared_dev": []}
    pair = 0
    while pair < n_pairs:
        r = draw(rng)
        neu, cat = build(ref, r, False), build(ref, r, True)
        far = np.flatnonzero(np.isin(cat.arrays["site"], FAR_CARBONS + (N_CARBON + 1,)))
        near = np.flatnonzero(cat.arrays["site"] <= 1)  # C1 and its hydrogens differ between the states
        hyd = np.flatnonzero(cat.arrays["site"] == 0)
        dmin = cat.get_all_distances()[np.ix_(hyd, far)].min()
        if dmin < MIN_FAR_DISTANCE:
            rejected["too_close"] += 1
            continue
        if any(receptive_field(a, far) & set(near.tolist()) for a in (neu, cat)):
            rejected["receptive_field"] += 1
            continue
        # shared atoms (C2..C10, H11) coincide up to a translation
        shared = np.arange(1, N_CARBON + 1)
        a = neu.positions[shared] - neu.positions[shared].mean(0)
        b = cat.positions[shared] - cat.positions[shared].mean(0)
        labelled = [label(neu, False, pair, r["scale"]), label(cat, True, pair, r["scale"])]
        if any(x is None for x in labelled):
            rejected["scf"] += 1
            continue
        stats["min_dist"].append(dmin)
        stats["shared_dev"].append(np.abs(a - b).max())
        frames += labelled
        pair += 1
    return frames, {"rejected": rejected, **stats}


def summarise(name: str, frames: list, info: dict) -> None:
    neu = [f for f in frames if f.info["charge"] == 0]
    cat = [f for f in frames if f.info["charge"] == 1]
    log(f"\n== {name}: {len(frames)} configurations ({len(neu)} neutral C10H2, {len(cat)} protonated "
        f"C10H3+), rejected draws {info['rejected']}")  # fmt: skip
    log(f"  shared atoms C2..C10,H11 identical in both members: max deviation "
        f"{max(info['shared_dev']):.1e} Å")  # fmt: skip
    log(f"  distance C1 hydrogens -> far-end atoms (C8,C9,C10,H11): min {min(info['min_dist']):.2f} Å, "
        f"mean {np.mean(info['min_dist']):.2f} Å (required >= {MIN_FAR_DISTANCE} Å)")  # fmt: skip
    for state, sub in (("neutral", neu), ("protonated", cat)):
        e = np.array([f.info["REF_energy"] for f in sub])
        fo = np.concatenate([f.arrays["REF_forces"] for f in sub])
        qt = np.array([f.arrays["REF_charges"].sum() for f in sub])
        log(f"  {state:<10} E {e.min():10.4f} .. {e.max():10.4f} eV (std {1000 * e.std():6.1f} meV)  "
            f"|F| rms {np.sqrt((fo**2).mean()):.3f} max {np.abs(fo).max():.3f} eV/Å  "
            f"sum q {qt.min():+.4f} .. {qt.max():+.4f} e")  # fmt: skip
    # pairwise comparison at the far end (identical coordinates there)
    dq, df, dq_h = [], [], []
    for n, c in zip(neu, cat):
        assert n.info["pair"] == c.info["pair"]
        sel_n = np.isin(n.arrays["site"], FAR_CARBONS)
        sel_c = np.isin(c.arrays["site"], FAR_CARBONS)
        dq.append(c.arrays["REF_charges"][sel_c] - n.arrays["REF_charges"][sel_n])
        h_n, h_c = n.arrays["site"] == N_CARBON + 1, c.arrays["site"] == N_CARBON + 1
        dq_h.append(c.arrays["REF_charges"][h_c] - n.arrays["REF_charges"][h_n])
        df.append(c.arrays["REF_forces"][sel_c] - n.arrays["REF_forces"][sel_n])
    dq, dq_h, df = np.array(dq), np.concatenate(dq_h), np.concatenate(df)
    log("  far-end reference charges, protonated minus neutral partner (same far-end geometry):")
    per_atom = ", ".join(f"C{k} {v:+.4f}" for k, v in zip(FAR_CARBONS, dq.mean(0)))
    log(f"    mean over C8,C9,C10: {dq.mean():+.4f} e  (per atom {per_atom}; pair mean min "
        f"{dq.mean(1).min():+.4f} max {dq.mean(1).max():+.4f}); H11 {dq_h.mean():+.4f} e")  # fmt: skip
    log(f"    sum over C8,C9,C10: {dq.sum(1).mean():+.4f} e; fraction of the pairs with mean dq > 0: "
        f"{(dq.mean(1) > 0).mean():.2f}")  # fmt: skip
    log(f"    lower bound for any model whose far-end charges depend only on features within "
        f"2 x {R_MAX} Å (same charge in both partners): RMSE >= {np.sqrt(np.mean((dq / 2) ** 2)):.4f} e "
        "on C8,C9,C10")  # fmt: skip
    log(f"  far-end forces (C8,C9,C10), protonated minus neutral partner: rms "
        f"{np.sqrt((df**2).mean()):.4f} eV/Å, max {np.abs(df).max():.4f} eV/Å")  # fmt: skip


def main() -> None:
    from importlib.metadata import version

    t0 = time.time()
    log(f"# generate_charge_transfer.py  method={METHOD}  tblite {version('tblite')}  ase {version('ase')}  "
        f"numpy {np.__version__}  OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")  # fmt: skip
    ref = optimise()
    log("\n== GFN2-xTB minima (BFGS, fmax 0.002 eV/Å), straight chains")
    for protonated, r in ref.items():
        name = "C10H3+ (H2C=C...C-H)" if protonated else "C10H2  (H-C...C-H)"
        log(f"  {name}  E = {r['energy']:.6f} eV  |F|max {r['fmax']:.4f} eV/Å")
        log(f"    C-C bonds C1-C2 .. C9-C10 (Å): {' '.join(f'{b:.4f}' for b in r['bonds'])}")
        log(f"    C-H far {r['ch_far']:.4f} Å, C-H at C1 {r['ch_near']:.4f} Å, H-C1-C2 {r['hcc']:.1f} deg")
        log(f"    charges C1..C10 (e): {' '.join(f'{q:+.3f}' for q in r['charges'][:N_CARBON])}")
        log(f"    charges H11, H(C1) (e): {' '.join(f'{q:+.3f}' for q in r['charges'][N_CARBON:])}")
    dq = ref[True]["charges"][:N_CARBON] - ref[False]["charges"][:N_CARBON]
    log(f"  minima: charge difference C10H3+ - C10H2 per carbon: {' '.join(f'{q:+.3f}' for q in dq)}")
    log(f"  minima: mean difference on C8,C9,C10 {dq[[k - 1 for k in FAR_CARBONS]].mean():+.4f} e")
    diff = ref[True]["bonds"] - ref[False]["bonds"]
    log(f"  minima: bond difference (Å): {' '.join(f'{b:+.4f}' for b in diff)}")
    log(
        "  sampled geometries use the mean of the two minima for C2-C3..C9-C10 and the far C-H, "
        "the own state's values for C1-C2 and the C1 hydrogens"
    )
    log(f"  distortions: C-C {SIGMA_CC} Å, C-H {SIGMA_CH} Å, bends {SIGMA_BEND} deg per component at each "
        f"chain atom, H-C1-C2 {SIGMA_HCC} deg, rattle {SIGMA_RATTLE} Å, all times a per-pair factor "
        f"U(0.5, 1.5); random CH2 azimuth and overall rotation")  # fmt: skip
    for name, (seed, n_pairs) in SPLITS.items():
        frames, info = build_split(name, seed, n_pairs, ref)
        log(f"\n# split {name}: seed {seed}")
        summarise(name, frames, info)
        write(HERE / f"chain_{name}.xyz", frames, format="extxyz")
    log(f"\n# total wall time {time.time() - t0:.1f} s")
    (HERE / "chain_generation_log.txt").write_text("\n".join(LOG) + "\n")


if __name__ == "__main__":
    main()
