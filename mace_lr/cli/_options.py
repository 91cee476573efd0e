"""The command line of ``mace_lr_run_train``: mace's parser plus the long-range options,
the block configuration (``--lr_blocks``/``--lr_config``) and the loss terms a run asked for.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
from typing import Any, Dict, List, Optional, Sequence

from .._keys import BORN_CHARGES, DIPOLE, EXTERNAL_FIELD, POLARIZABILITY, POLARIZATION
from .._outputs import PER_ATOM, declared_targets


def build_parser() -> argparse.ArgumentParser:
    """Mace's argument parser with the mace-lr options added."""
    from mace.tools import build_default_arg_parser

    parser = build_default_arg_parser()
    parser.prog = "mace_lr_run_train"
    group = parser.add_argument_group("long-range blocks (mace-lr)")
    group.add_argument(
        "--lr_blocks",
        type=str,
        default=None,
        help="long-range block(s) to attach, comma separated (e.g. 'les'); see mace_lr.available_blocks()",
    )
    group.add_argument(
        "--lr_plugin",
        type=str,
        default=None,
        help="Python module(s), comma separated, imported before anything else; a module that calls "
        "mace_lr.register_block makes its blocks (and their target flags) available without an "
        "installed entry point. Give it on the command line (it adds flags, so not in --config)",
    )
    group.add_argument(
        "--lr_config",
        type=str,
        default=None,
        help="YAML or JSON file (or inline JSON) with block options: {block: {option: value}}; "
        "with one block a flat {option: value} mapping is accepted",
    )
    group.add_argument(
        "--lr_block_lr",
        type=float,
        default=None,
        help="learning rate of the long-range blocks' parameters (default: --lr); with a smaller "
        "--lr the base model moves slowly while a new block learns",
    )
    group.add_argument(
        "--lr_batch_groups",
        type=str,
        default=None,
        help="atoms.info key: training structures sharing its value go into the same batch (whole "
        "groups, packed up to --batch_size structures, groups shuffled every epoch). For data whose "
        "signal is a difference within a group, e.g. the end-group quartets of tutorial 6",
    )
    group.add_argument(
        "--external_field_key",
        type=str,
        default="external_field",
        help="atoms.info key of the applied field (3-vector, V/Å); structures without it are at zero field",
    )
    group.add_argument(
        "--born_charges_key",
        type=str,
        default="REF_born_charges",
        help="atoms.arrays key of Born effective charges Z[i,a,b] = dF_ib/dE_a = dmu_a/dR_ib (e), "
        "9 columns per atom, row-major",
    )
    group.add_argument(
        "--born_charges_weight",
        type=float,
        default=0.0,
        help="weight of the Born effective charge loss (mean squared error per component, e^2)",
    )
    group.add_argument(
        "--polarization_key",
        type=str,
        default="REF_polarization",
        help="atoms.info key of the polarization of periodic structures (3-vector, e/Å^2), on any branch",
    )
    group.add_argument(
        "--polarization_weight",
        type=float,
        default=0.0,
        help="weight of the polarization loss, compared modulo the quantum e*a_k/Omega along each "
        "periodic lattice vector (minimum image); (e/Å^2)^-2",
    )
    _add_declared_targets(parser)
    parser.epilog = (
        "mace-lr reads mace's --dipole_key/--dipole_weight and --polarizability_key/"
        "--polarizability_weight as losses on the model's dipole (e·Å; periodic cells modulo e·a_k) "
        "and polarizability -d2U/dE2 (e·Å²/V, 9 values per structure) when either flag of a pair is given."
    )
    return parser


def import_plugin_modules(argv: Sequence[str]) -> List[str]:
    """Import the modules named by ``--lr_plugin`` in ``argv`` (before the parser is built,
    so that the blocks they register bring their target flags).

    Raises:
        ValueError: a module cannot be imported.
    """
    names: List[str] = []
    for i, arg in enumerate(argv):
        if arg == "--lr_plugin" and i + 1 < len(argv):
            names += argv[i + 1].split(",")
        elif arg.startswith("--lr_plugin="):
            names += arg.split("=", 1)[1].split(",")
    names = [n.strip() for n in names if n.strip()]
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ValueError(f"--lr_plugin {name!r} cannot be imported: {exc}") from exc
    return names


def _add_declared_targets(parser: argparse.ArgumentParser) -> None:
    """A weight flag (and, unless mace has it, a key flag) for every training target the
    available blocks declare (:class:`mace_lr.Target`).
    """
    group = parser.add_argument_group("training targets declared by blocks (mace-lr)")
    for name, (output, providers) in declared_targets().items():
        target = output.target
        blocks = ", ".join(providers)
        if f"--{target.key_flag}" not in parser._option_string_actions:
            where = "atoms.arrays" if output.per == PER_ATOM else "atoms.info"
            rows = "n_atoms" if output.per == PER_ATOM else "1"
            shape = ", ".join([rows] + [str(n) for n in output.shape])
            group.add_argument(
                f"--{target.key_flag}",
                type=str,
                default=target.default_key,
                help=f"{where} key of {output.what} ({output.unit}, [{shape}]"
                + ("; NaN rows for atoms without one" if output.per == PER_ATOM else "")
                + f"), for blocks that predict them ({blocks})",
            )
        group.add_argument(
            f"--{target.weight_flag}",
            type=float,
            default=0.0,
            help=target.help or f"weight of the loss on {output.what} ({blocks}); 0: off",
        )


def parse_block_config(lr_blocks: Optional[str], lr_config: Optional[str]) -> Dict[str, Dict[str, Any]]:
    """Turn ``--lr_blocks`` / ``--lr_config`` into ``{name: options}``."""
    names = [n.strip() for n in (lr_blocks or "").split(",") if n.strip()]
    config: Dict[str, Any] = {}
    if lr_config:
        if os.path.exists(lr_config):
            with open(lr_config, encoding="utf-8") as fh:
                text = fh.read()
            if lr_config.endswith((".yaml", ".yml")):
                import yaml

                config = yaml.safe_load(text) or {}
            else:
                config = json.loads(text)
        else:
            try:
                config = json.loads(lr_config)
            except json.JSONDecodeError as exc:
                raise ValueError(f"--lr_config {lr_config!r} is neither a file nor valid JSON") from exc
        if not isinstance(config, dict):
            raise ValueError(f"--lr_config must hold a mapping, got {type(config).__name__}")
    if config and names and not set(config) <= set(names):
        if len(names) == 1:  # a flat {option: value} mapping (values may be mappings too)
            config = {names[0]: config}
        else:
            extra = sorted(set(config) - set(names))
            raise ValueError(
                f"--lr_config has options for block(s) {extra} not listed in --lr_blocks {names}"
            )
    return {name: dict(config.get(name) or {}) for name in names}


def _flag_given(args: argparse.Namespace, argv: Sequence[str], names: Sequence[str]) -> bool:
    """Whether any of ``names`` was set on the command line or in the ``--config`` file."""
    if any(a.split("=")[0] in names for a in argv):
        return True
    config = getattr(args, "config", None)
    if config and os.path.isfile(config):
        import yaml

        with open(config, encoding="utf-8") as fh:
            options = yaml.safe_load(fh) or {}
        return isinstance(options, dict) and any(n.lstrip("-") in options for n in names)
    return False


def loss_weights(args: argparse.Namespace, argv: Sequence[str]) -> Dict[str, float]:
    """Weights of the long-range loss terms a run asked for (0: off).

    mace's own ``--dipole_*`` and ``--polarizability_*`` flags (whose weights default to 1)
    switch their term on when either flag of the pair is given; the mace-lr weights
    default to 0.
    """
    dipole = _flag_given(args, argv, ("--dipole_key", "--dipole_weight"))
    polarizability = _flag_given(args, argv, ("--polarizability_key", "--polarizability_weight"))
    return {
        DIPOLE: float(args.dipole_weight) if dipole else 0.0,
        POLARIZABILITY: float(args.polarizability_weight) if polarizability else 0.0,
        BORN_CHARGES: float(args.born_charges_weight),
        POLARIZATION: float(args.polarization_weight),
        # a block registered after the parser was built has no flag: its term is off
        **{
            name: float(getattr(args, out.target.weight_flag, 0.0))
            for name, (out, _) in declared_targets().items()
        },
    }


def target_keys(args: argparse.Namespace) -> Dict[str, str]:
    """Data key of each long-range target (and of the applied field)."""
    return {
        DIPOLE: args.dipole_key,
        POLARIZABILITY: args.polarizability_key,
        BORN_CHARGES: args.born_charges_key,
        POLARIZATION: args.polarization_key,
        **{name: getattr(args, out.target.key_flag, None) for name, (out, _) in declared_targets().items()},
        EXTERNAL_FIELD: args.external_field_key,
    }
