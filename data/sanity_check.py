"""Sanity check of the shipped data and base model (prints tables, writes nothing).

    python data/sanity_check.py                                   # data/base_mace.model
    python data/sanity_check.py --model data/base_mace_dimers.model  # the earlier dimer-only base

1. Binding energy E(AB) - E(A) - E(B) of tetramethylammonium + nitrate along one fixed random
   orientation (rigid monomers from data/monomers.xyz): GFN2-xTB vs the point-charge Coulomb
   energy -14.40/r vs the short-range base MACE (data/base_mace.model).
2. Base MACE binding-energy errors on data/dimers_valid.xyz (3.5–8 Å, training range) and
   data/dimers_test.xyz (9–15 Å, held out), per config_type and, for ion pairs, per separation
   bin. The model's binding energy uses the same fragment geometries as the reference
   (atoms.arrays["fragment"]), so errors of the model's monomer energies cancel.
3. Base MACE total-energy and force errors on the small molecules of
   data/generate_base_molecules.py: data/base_molecules_valid.xyz (species seen in training,
   new rattles) by charge and kind, and data/base_molecules_heldout.xyz (families never
   trained on) by species. Configurations with elements the model does not know are skipped.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import warnings
from pathlib import Path

import numpy as np
from ase.io import read

warnings.filterwarnings("ignore")
HERE = Path(__file__).resolve().parent
COULOMB = 14.399645  # eV·Å


def base_calc(path: Path):
    from mace.calculators import MACECalculator

    return MACECalculator(model_paths=str(path), device="cpu", default_dtype="float64")


def energy(atoms, calc) -> float:
    a = atoms.copy()
    a.calc = calc
    return float(a.get_potential_energy())


def scan(calc) -> None:
    from tblite.ase import TBLite

    mono = {a.info["name"]: a for a in read(HERE / "monomers.xyz", ":")}
    A, B0 = mono["tetramethylammonium"].copy(), mono["nitrate"].copy()
    rng = np.random.default_rng(7)
    n = rng.normal(size=3)
    n /= np.linalg.norm(n)
    xtb = lambda q: TBLite(method="GFN2-xTB", charge=q, verbosity=0)  # noqa: E731
    ea_ref, eb_ref = energy(A, xtb(1)), energy(B0, xtb(-1))
    ea_ml, eb_ml = energy(A, calc), energy(B0, calc)
    print("Binding energy, tetramethylammonium+ + nitrate-, one fixed orientation (eV)")
    print(f"{'r (Å)':>6} {'GFN2-xTB':>9} {'-14.40/r':>9} {'xTB/Coul':>9} {'base MACE':>10} {'MACE-xTB':>9}")
    for r in (4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 12.0, 15.0):
        B = B0.copy()
        B.positions += r * n
        d = A + B
        e_ref = energy(d, xtb(0)) - ea_ref - eb_ref
        e_ml = energy(d, calc) - ea_ml - eb_ml
        c = -COULOMB / r
        print(f"{r:6.1f} {e_ref:9.4f} {c:9.4f} {e_ref / c:9.3f} {e_ml:10.4f} {e_ml - e_ref:9.4f}")


def binding_errors(calc, fname: str, title: str, bins) -> None:
    frames = [a for a in read(HERE / fname, ":") if a.info["config_type"] != "monomer"]
    rows = []
    for a in frames:
        f = a.arrays["fragment"]
        e_ml = energy(a, calc) - energy(a[f == 0], calc) - energy(a[f == 1], calc)
        rows.append((a.info["config_type"], a.info["separation"], a.info["REF_binding_energy"], e_ml))
    print(f"\nBase MACE binding energies on data/{fname} ({title}), eV")
    print(f"{'config_type':<12}{'n':>4} {'<E_bind ref>':>13} {'<E_bind MACE>':>14} {'MAE':>8} "
          f"{'RMSE':>8} {'max|err|':>9}")  # fmt: skip

    def line(label, sub):
        ref = np.array([x[2] for x in sub])
        ml = np.array([x[3] for x in sub])
        err = ml - ref
        print(f"{label:<12}{len(sub):>4} {ref.mean():13.4f} {ml.mean():14.4f} {np.abs(err).mean():8.4f} "
              f"{np.sqrt((err**2).mean()):8.4f} {np.abs(err).max():9.4f}")  # fmt: skip

    for ctype in ("ion_pair", "like_pair", "ion_polar", "polar_pair"):
        line(ctype, [x for x in rows if x[0] == ctype])
    line("all", rows)
    print("\nion pairs by separation bin (eV)")
    print(f"{'r bin (Å)':<12}{'n':>4} {'<E_bind ref>':>13} {'<-14.40/r>':>11} {'<E_bind MACE>':>14} "
          f"{'MAE':>8}")  # fmt: skip
    ion = [x for x in rows if x[0] == "ion_pair"]
    for lo, hi in bins:
        sub = [x for x in ion if lo <= x[1] < hi]
        if not sub:
            continue
        ref = np.array([x[2] for x in sub])
        ml = np.array([x[3] for x in sub])
        c = np.array([-COULOMB / x[1] for x in sub])
        print(f"{f'{lo}-{hi}':<12}{len(sub):>4} {ref.mean():13.4f} {c.mean():11.4f} {ml.mean():14.4f} "
              f"{np.abs(ml - ref).mean():8.4f}")  # fmt: skip


def molecule_errors(calc) -> None:
    known = {int(z) for z in calc.models[0].atomic_numbers}

    def stats(sub):
        de = np.array([energy(a, calc) - a.info["REF_energy"] for a in sub])
        n = np.array([len(a) for a in sub])
        df = []
        for a in sub:
            b = a.copy()
            b.calc = calc
            df.append(b.get_forces() - a.arrays["REF_forces"])
        df = np.concatenate(df)
        e_atom, f_rmse = 1000 * np.sqrt(((de / n) ** 2).mean()), 1000 * np.sqrt((df**2).mean())
        return f"{len(sub):>4} {de.mean():9.3f} {np.sqrt((de**2).mean()):9.3f} {e_atom:10.1f} {f_rmse:9.1f}"

    head = f"{'n':>4} {'<dE> eV':>9} {'RMSE eV':>9} {'meV/atom':>10} {'F meV/Å':>9}"
    for fname, key in (("base_molecules_valid.xyz", "group"), ("base_molecules_heldout.xyz", "mol_A")):
        frames = [a for a in read(HERE / fname, ":") if set(a.numbers) <= known]
        skipped = len(read(HERE / fname, ":")) - len(frames)
        print(f"\nBase MACE total energies on data/{fname} ({skipped} skipped: unknown elements)")
        print(f"{key:<22}{head}")
        for a in frames:
            q = a.info["charge"]
            kind = "pair" if a.info["config_type"].endswith("pair") else "monomer"
            a.info["group"] = f"{kind} q{'=0' if q == 0 else ('>0' if q > 0 else '<0')}"
        for g in sorted({a.info[key] for a in frames}):
            print(f"{g:<22}{stats([a for a in frames if a.info[key] == g])}")
        if frames:
            print(f"{'all':<22}{stats(frames)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=HERE / "base_mace.model")
    calc = base_calc(parser.parse_args().model)
    scan(calc)
    binding_errors(calc, "dimers_valid.xyz", "3.5–8 Å, training range", ((3.5, 5), (5, 6.5), (6.5, 8)))
    binding_errors(calc, "dimers_test.xyz", "9–15 Å, held out", ((9, 11), (11, 13), (13, 15)))
    molecule_errors(calc)
