"""Checks run before training starts, so that a bad run fails at once with a message
naming the problem (unknown block, bad options, missing data keys, target shapes,
elements the foundation model does not know) instead of mid-run.
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any, Dict, List, Optional, Sequence

import torch

from .._keys import BORN_CHARGES, EXTERNAL_FIELD, POLARIZABILITY, POLARIZATION, TOTAL_CHARGE, TOTAL_SPIN
from .._mace_adapter import base_atomic_numbers
from .._outputs import PER_ATOM, Output, declared_outputs, declared_targets
from ._options import target_keys

logger = logging.getLogger(__name__)


def read_foundation(path: str):
    """Return a mace-lr model if ``path`` is a mace-lr model file, else None."""
    if not path or not os.path.isfile(path):
        return None
    from mace_lr import load

    try:
        return load(path)  # refuses (ValueError) pickled MACE files and foreign formats
    except ValueError:
        return None


def _data_keys_and_elements(frames: Sequence[Any], info_keys: Sequence[str]) -> Dict[str, Any]:
    elements = sorted({int(z) for atoms in frames for z in atoms.numbers})
    missing = {
        key: sum(1 for atoms in frames if key not in atoms.info and key not in atoms.arrays)
        for key in info_keys
    }
    return {"n": len(frames), "elements": elements, "missing": missing}


def preflight(
    args: argparse.Namespace,
    weights: Dict[str, float],
    specs: Dict[str, Dict[str, Any]],
    foundation,
) -> None:
    """Fail at start, with a message naming the problem, instead of mid-run.

    ``weights`` are the run's loss terms (:func:`loss_weights`).
    """
    from ase.data import chemical_symbols

    from mace_lr.registry import get_block

    if args.foundation_model is not None and not os.path.isfile(args.foundation_model):
        from mace_lr._mace_adapter import foundation_model_names

        names = foundation_model_names()
        if args.foundation_model not in names:
            raise ValueError(
                f"--foundation_model {args.foundation_model!r} is neither a model file nor a name mace "
                f"resolves ({', '.join(names)})"
            )
    # the foundation model's elements, read once (None: a named model, resolved by mace)
    fz = _foundation_elements(args, foundation) if args.foundation_model is not None else None
    required: List[str] = []
    classes: Dict[str, type] = {}
    targets = {name: declared for name, declared in declared_targets().items() if weights.get(name, 0) > 0}
    for name, options in specs.items():
        cls = classes[name] = get_block(name)  # unknown names raise with suggestions
        for output, providers in targets.values():
            _check_summed_target(name, cls, output, providers)
        if not isinstance(options, dict):
            raise ValueError(f"options of block {name!r} must be a mapping, got {options!r}")
        _check_block_options(name, cls, options, fz)
        required += [_data_key(args, key) for key in cls.required_inputs_for(options)]
    blocks = dict(classes)
    if foundation is not None:
        blocks.update({name: type(block) for name, block in foundation.blocks.items()})
    for output, providers in targets.values():
        if not any(output.name in declared_targets({n: c}) for n, c in blocks.items()):
            raise ValueError(
                f"--{output.target.weight_flag} > 0 but none of the blocks {sorted(blocks)} predicts "
                f"{output.what}; attach one with --lr_blocks {','.join(providers)}"
            )
    keys = target_keys(args)
    required += [keys[name] for name, weight in weights.items() if weight > 0]
    if getattr(args, "lr_batch_groups", None):
        required.append(args.lr_batch_groups)
    block_lr = getattr(args, "lr_block_lr", None)
    if block_lr is not None and not block_lr > 0:
        raise ValueError(f"--lr_block_lr must be > 0, got {block_lr}")
    if args.train_file and os.path.isfile(args.train_file) and args.train_file.endswith((".xyz", ".extxyz")):
        import ase.io

        frames = ase.io.read(args.train_file, index=":")
        info = _data_keys_and_elements(frames, required)
        for key, count in info["missing"].items():
            if count:
                hint = ""
                if key == args.total_charge_key:
                    hint = (
                        " (the total charge; e.g. pass --total_charge_key charge if your file "
                        "stores atoms.info['charge'])"
                    )
                raise ValueError(
                    f"{count} of {info['n']} structures in {args.train_file} lack the key {key!r}{hint}, "
                    "which the requested blocks/losses need"
                )
        _check_target_shapes(frames, args.train_file, args, weights)
        for name, cls in classes.items():
            for key in getattr(cls, "optional_inputs", ()):
                key = _data_key(args, key)
                if not any(key in a.info or key in a.arrays for a in frames):
                    logger.warning(
                        "block %r requested but no structure of %s has %r, an input it reads: it "
                        "cannot learn from it, only from losses on its other outputs and responses",
                        name,
                        args.train_file,
                        key,
                    )
        if fz is not None:
            uncovered = [z for z in info["elements"] if z not in fz]
            if uncovered:
                names = ", ".join(chemical_symbols[z] for z in uncovered)
                raise ValueError(
                    f"the foundation model {args.foundation_model} does not know element(s) {names} "
                    f"present in {args.train_file}; it covers "
                    f"{', '.join(chemical_symbols[z] for z in fz)}"
                )


def _data_key(args: argparse.Namespace, key: str) -> str:
    """The data key (atoms.info or atoms.arrays) of a context key, as the run's flags name it."""
    flags = {
        TOTAL_CHARGE: "total_charge_key",
        TOTAL_SPIN: "total_spin_key",
        EXTERNAL_FIELD: "external_field_key",
    }
    return getattr(args, flags[key]) if key in flags else key


def _check_summed_target(name: str, cls: type, output: Output, providers: Sequence[str]) -> None:
    """A loss on an output summed over blocks (charges) fits every block's share: each block
    returning that output must declare it as a training target.
    """
    own = [o for o in declared_outputs(cls).values() if o.name == output.name]
    if output.summed and own and own[0].target is None:
        raise ValueError(
            f"--{output.target.weight_flag} > 0 but block {name!r} predicts {own[0].what}, which are no "
            f"training target; blocks whose {output.name} may be fitted: {', '.join(providers)}"
        )


def _check_block_options(
    name: str, cls: type, options: Dict[str, Any], elements: Optional[List[int]]
) -> None:
    """Build the block once on stand-in features so that bad options fail before training.

    The real block is built after mace has loaded the data and the model; a missing or
    misspelt option would otherwise stop the run only then. ``elements``: the foundation
    model's; without them (training from scratch, a named foundation model) the elements
    come from mace and the options are checked when the block is built.
    """
    if not elements:
        return
    try:
        cls(feature_irreps="4x0e+4x1o", atomic_numbers=elements, r_max=5.0, **options)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"block {name!r}: {exc}") from exc


def _check_target_shapes(
    frames: Sequence[Any], path: str, args: argparse.Namespace, weights: Dict[str, float]
) -> None:
    """Response targets must have the documented shapes; polarizations need periodic cells."""
    import numpy as np

    declared = {
        name: item
        for name, item in declared_targets().items()
        if weights.get(name, 0) > 0 and item[0].target.default_key is not None  # mace checks its own
    }
    for index, atoms in enumerate(frames):
        if weights[BORN_CHARGES] > 0:
            z = np.asarray(atoms.arrays[args.born_charges_key])
            if z.reshape(len(atoms), -1).shape[1] != 9:
                raise ValueError(
                    f"structure {index} of {path}: atoms.arrays[{args.born_charges_key!r}] must hold 9 "
                    f"values per atom (Z[i, a, b] row-major), got shape {z.shape}"
                )
        if weights[POLARIZABILITY] > 0 and np.size(atoms.info[args.polarizability_key]) != 9:
            raise ValueError(
                f"structure {index} of {path}: atoms.info[{args.polarizability_key!r}] must hold 9 values "
                f"(a 3x3 polarizability, e·Å²/V), got {np.size(atoms.info[args.polarizability_key])}"
            )
        if weights[POLARIZATION] > 0:
            if np.size(atoms.info[args.polarization_key]) != 3:
                raise ValueError(
                    f"structure {index} of {path}: atoms.info[{args.polarization_key!r}] must be a "
                    "3-vector (e/Å²)"
                )
            if not atoms.pbc.any() or atoms.get_volume() <= 0:
                raise ValueError(
                    f"structure {index} of {path} is not periodic, so it has no polarization; "
                    "train molecules on --dipole_key instead"
                )
        for output, _ in declared.values():
            _check_declared_shape(atoms, index, path, output, getattr(args, output.target.key_flag))
        if args.external_field_key in atoms.info and np.size(atoms.info[args.external_field_key]) != 3:
            raise ValueError(
                f"structure {index} of {path}: atoms.info[{args.external_field_key!r}] must be a "
                "3-vector in V/Å"
            )


def _check_declared_shape(atoms, index: int, path: str, output: Output, key: str) -> None:
    """A declared target's reference must have one row per atom (per-atom outputs, in
    ``atoms.arrays``) or hold ``prod(shape)`` values (per-structure outputs, in ``atoms.info``).
    """
    import numpy as np

    if output.per == PER_ATOM:
        value = np.asarray(atoms.arrays[key], dtype=float)
        if value.shape != (len(atoms), *output.shape):
            shape = ", ".join(["n_atoms"] + [str(n) for n in output.shape])
            raise ValueError(
                f"structure {index} of {path}: atoms.arrays[{key!r}] must have shape [{shape}] "
                f"({output.unit}; NaN rows for atoms without one), got {value.shape}"
            )
    elif np.size(atoms.info[key]) != int(np.prod(output.shape)):
        raise ValueError(
            f"structure {index} of {path}: atoms.info[{key!r}] must hold {int(np.prod(output.shape))} "
            f"value(s) ({output.what}, {output.unit}), got {np.size(atoms.info[key])}"
        )


def _foundation_elements(args, foundation) -> Optional[List[int]]:
    if foundation is not None:
        return base_atomic_numbers(foundation)
    if os.path.isfile(args.foundation_model):
        model = torch.load(args.foundation_model, map_location="cpu", weights_only=False)
        return base_atomic_numbers(model)  # refuses files of mace-torch 0.1.0, naming it
    return None  # named foundation models are resolved (and checked) by mace itself
