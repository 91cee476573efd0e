"""Add per-atom ``formal_charges`` to the shipped dimer and monomer files, without relabelling.

    python data/add_formal_charges.py        # ~2 s; rewrites the six files in place

``generate_dimers.py`` and ``generate_leave_family_out.py`` now write the array themselves;
this script gave the files shipped before that change the same array, so that the xTB labels
need not be recomputed. Each fragment's formal charge (``charge_A``/``charge_B`` where the
file has them, else the molecule's entry in ``generate_dimers.FORMAL_CHARGE``, else the
structure's ``charge`` for a single fragment) goes on its first atom, zeros elsewhere: LES
with ``charge_groups="fragments"`` uses only the sums over each bonded fragment. Every
structure is checked: the fragments' charges add up to ``atoms.info["charge"]``. Positions,
forces and the other arrays are read and written by ASE's extxyz at the precision they
were stored with (checked after writing).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from ase.io import read, write

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import generate_dimers as gd  # noqa: E402

FILES = (
    "dimers_train.xyz", "dimers_valid.xyz", "dimers_test.xyz", "monomers.xyz",
    "leave_family_out_test.xyz", "leave_family_out_monomers.xyz",
)  # fmt: skip


def fragment_charges(atoms) -> tuple:
    info = atoms.info
    if "fragment" not in atoms.arrays or len(set(atoms.arrays["fragment"].tolist())) == 1:
        return (int(info["charge"]),)
    if "charge_A" in info:
        return int(info["charge_A"]), int(info["charge_B"])
    return gd.FORMAL_CHARGE[info["mol_A"]], gd.FORMAL_CHARGE[info["mol_B"]]


def main() -> None:
    for name in FILES:
        frames = read(HERE / name, index=":")
        before = read(HERE / name, index=":")
        for index, atoms in enumerate(frames):
            charges = fragment_charges(atoms)
            if abs(sum(charges) - float(atoms.info["charge"])) > 1e-9:
                raise ValueError(
                    f"{name} structure {index}: fragment charges {charges} vs {atoms.info['charge']}"
                )
            fragment = atoms.arrays.get("fragment", np.zeros(len(atoms), int))
            atoms.arrays["formal_charges"] = gd.formal_charges(fragment, charges)
        write(HERE / name, frames, format="extxyz")
        after = read(HERE / name, index=":")
        for a, b in zip(before, after):
            assert np.array_equal(a.positions, b.positions) and set(a.info) == set(b.info)
            for key in a.info:
                assert np.array_equal(np.asarray(a.info[key]), np.asarray(b.info[key])), (name, key)
            for key in a.arrays:
                assert np.array_equal(a.arrays[key], b.arrays[key]), (name, key)
        ions = sum(1 for a in frames if np.abs(a.arrays["formal_charges"]).sum() > 0)
        print(f"{name}: {len(frames)} structures, {ions} with charged fragments")


if __name__ == "__main__":
    main()
