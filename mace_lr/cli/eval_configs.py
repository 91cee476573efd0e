"""``mace_lr_eval_configs``: evaluate a mace-lr model on an extxyz file.

Like mace's ``mace_eval_configs``: writes ``{prefix}energy``, ``{prefix}forces``,
``{prefix}stress`` (periodic) and, from the long-range blocks, ``{prefix}charges``,
``{prefix}lr_energy``, ``{prefix}dipole``, ``{prefix}polarization`` (periodic), every
output the blocks declare (per atom in ``atoms.arrays``, per structure in ``atoms.info``;
e.g. ``{prefix}wannier_centroids``, [N, 3] Å, NaN rows for atoms without a centroid) and, with
``--compute_bec``, ``{prefix}born_effective_charges`` (flattened [N, 9]) and with
``--compute_polarizability``, ``{prefix}polarizability`` (flattened 9, e·Å²/V). Each structure
is evaluated in its own ``atoms.info["external_field"]`` (V/Å), if any.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

import mace  # noqa: F401
import numpy as np


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mace_lr_eval_configs", description=__doc__.splitlines()[0])
    parser.add_argument("--configs", required=True, help="extxyz file to evaluate")
    parser.add_argument("--model", required=True, help="mace-lr model file")
    parser.add_argument("--output", required=True, help="extxyz file to write")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--default_dtype", default="float64", choices=["float32", "float64"])
    parser.add_argument("--info_prefix", default="MACE_", help="prefix of the written keys")
    parser.add_argument("--compute_bec", action="store_true", help="also write Born effective charges")
    parser.add_argument(
        "--compute_polarizability", action="store_true", help="also write polarizabilities -d2U/dE2"
    )
    parser.add_argument(
        "--lr_plugin",
        default=None,
        help="Python module(s), comma separated, to import first (blocks registered with "
        "mace_lr.register_block, as for mace_lr_run_train)",
    )
    parser.add_argument(
        "--allow_pickle", action="store_true", help="accept pickled model files (trusted only)"
    )
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Console entry point."""
    import ase.io
    from tqdm import tqdm

    from mace_lr._outputs import PER_ATOM
    from mace_lr.calculator import MACELRCalculator
    from mace_lr.cli._options import import_plugin_modules

    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        import_plugin_modules(["--lr_plugin", args.lr_plugin] if args.lr_plugin else [])
    except ValueError as exc:
        parser.exit(2, f"mace_lr_eval_configs: error: {exc}\n")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s: %(message)s")
    calc = MACELRCalculator(
        args.model, device=args.device, default_dtype=args.default_dtype, allow_pickle=args.allow_pickle
    )
    declared = {n: o for n, o in calc.model.declared_outputs.items() if n != "charges"}
    frames = ase.io.read(args.configs, index=":")
    p = args.info_prefix
    out = []
    for atoms in tqdm(frames, desc="evaluating", unit="config", disable=None):
        atoms = atoms.copy()
        atoms.calc = None
        props = ["energy", "forces"] + (["born_effective_charges"] if args.compute_bec else [])
        props += ["polarizability"] if args.compute_polarizability else []
        calc.calculate(atoms, props, ["positions", "numbers", "cell", "pbc"])
        res = calc.results
        atoms.info[f"{p}energy"] = res["energy"]
        atoms.info[f"{p}lr_energy"] = res["lr_energy"]
        atoms.arrays[f"{p}forces"] = res["forces"]
        if "stress" in res:
            atoms.info[f"{p}stress"] = res["stress"]
        if "charges" in res:
            atoms.arrays[f"{p}charges"] = res["charges"]
        atoms.info[f"{p}dipole"] = np.asarray(res["dipole"])
        for name, output in declared.items():  # per atom in arrays, per structure in info
            if name in res:
                where = atoms.arrays if output.per == PER_ATOM else atoms.info
                where[f"{p}{name}"] = res[name]
        if "polarization" in res:
            atoms.info[f"{p}polarization"] = res["polarization"]
        if args.compute_bec:
            atoms.arrays[f"{p}born_effective_charges"] = res["born_effective_charges"].reshape(len(atoms), 9)
        if args.compute_polarizability:
            atoms.info[f"{p}polarizability"] = np.asarray(res["polarizability"]).reshape(9)
        out.append(atoms)
    ase.io.write(args.output, out, format="extxyz")
    logging.info("wrote %d configurations to %s", len(out), args.output)


if __name__ == "__main__":
    main()
