"""``mace_lr_run_train``: mace's ``mace_run_train`` plus long-range blocks.

Every ``mace_run_train`` flag keeps its meaning; the training loop, data pipeline,
checkpoints, EMA, SWA/stage two, LoRA, freezing and ``--distributed`` are mace's own.
mace-lr adds ``--lr_blocks`` and ``--lr_config`` and hooks three places of mace's run:

* model construction: the model mace builds is wrapped with :func:`mace_lr.augment`
  (identity at initialisation); when the foundation model is itself a mace-lr model its
  blocks and their weights are carried over;
* parameter groups: every block parameter is added to the optimiser (mace's groups only
  know its own modules — a silent trap upstream);
* the loss: a dipole term from the blocks' dipoles when ``--dipole_key``/``--dipole_weight``
  is given.

At the end the ``.model`` files mace wrote are rewritten in mace-lr's safe format, which
``mace_lr.load`` and ``MACELRCalculator`` read.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
from typing import Any, Dict, List, Optional, Sequence
from unittest import mock

import mace  # noqa: F401  (before e3nn)
import torch

from mace_lr.response import dipole_minimum_image

logger = logging.getLogger(__name__)


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
        "--lr_config",
        type=str,
        default=None,
        help="YAML or JSON file (or inline JSON) with block options: {block: {option: value}}; "
        "with one block a flat {option: value} mapping is accepted",
    )
    group.add_argument(
        "--lr_charges_weight",
        type=float,
        default=0.0,
        help="weight of a loss on REF_charges (--charges_key); only for blocks whose charges are "
        "physical observables (never LES latent charges)",
    )
    return parser


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
        if len(names) == 1 and not any(isinstance(v, dict) for v in config.values()):
            config = {names[0]: config}
        else:
            extra = sorted(set(config) - set(names))
            raise ValueError(
                f"--lr_config has options for block(s) {extra} not listed in --lr_blocks {names}"
            )
    return {name: dict(config.get(name) or {}) for name in names}


def _read_foundation(path: str):
    """Return a mace-lr model if ``path`` is a mace-lr model file, else None."""
    if not path or not os.path.isfile(path):
        return None
    from mace_lr import load

    try:
        return load(path)  # refuses (ValueError) pickled MACE files and foreign formats
    except ValueError:
        return None


def _data_keys_and_elements(path: str, info_keys: Sequence[str]) -> Dict[str, Any]:
    import ase.io

    frames = ase.io.read(path, index=":")
    elements = sorted({int(z) for atoms in frames for z in atoms.numbers})
    missing = {
        key: sum(1 for atoms in frames if key not in atoms.info and key not in atoms.arrays)
        for key in info_keys
    }
    return {"n": len(frames), "elements": elements, "missing": missing}


def preflight(
    args: argparse.Namespace, argv: Sequence[str], specs: Dict[str, Dict[str, Any]], foundation
) -> None:
    """Fail at start, with a message naming the problem, instead of mid-run."""
    from ase.data import chemical_symbols

    from mace_lr.registry import get_block

    required: List[str] = []
    for name, options in specs.items():
        cls = get_block(name)  # unknown names raise with suggestions
        if args.lr_charges_weight > 0 and not getattr(cls, "accepts_charge_targets", False):
            raise ValueError(
                f"--lr_charges_weight > 0 but block {name!r} predicts latent charges, which are not "
                "physical partial charges; fitting them to a charge partition is not supported"
            )
        if not isinstance(options, dict):
            raise ValueError(f"options of block {name!r} must be a mapping, got {options!r}")
        for key in getattr(cls, "required_inputs", ()):
            if key == "total_charge":
                required.append(args.total_charge_key)
            elif key == "total_spin":
                required.append(args.total_spin_key)
            else:
                required.append(key)
    if _dipole_requested(argv):
        required.append(args.dipole_key)
    if args.lr_charges_weight > 0:
        required.append(args.charges_key)
    if args.train_file and os.path.isfile(args.train_file) and args.train_file.endswith((".xyz", ".extxyz")):
        info = _data_keys_and_elements(args.train_file, required)
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
        if args.foundation_model is not None:
            fz = _foundation_elements(args, foundation)
            if fz is not None:
                uncovered = [z for z in info["elements"] if z not in fz]
                if uncovered:
                    names = ", ".join(chemical_symbols[z] for z in uncovered)
                    raise ValueError(
                        f"the foundation model {args.foundation_model} does not know element(s) {names} "
                        f"present in {args.train_file}; it covers "
                        f"{', '.join(chemical_symbols[z] for z in fz)}"
                    )


def _foundation_elements(args, foundation) -> Optional[List[int]]:
    if foundation is not None:
        return [int(z) for z in foundation.atomic_numbers.tolist()]
    if os.path.isfile(args.foundation_model):
        model = torch.load(args.foundation_model, map_location="cpu", weights_only=False)
        return [int(z) for z in model.atomic_numbers.tolist()]
    return None  # named foundation models are resolved (and checked) by mace itself


def _dipole_requested(argv: Sequence[str]) -> bool:
    return any(a.split("=")[0] in ("--dipole_key", "--dipole_weight") for a in argv)


def _batch_value(batch: Any, key: str) -> Optional[torch.Tensor]:
    try:
        return batch[key]
    except (KeyError, AttributeError, TypeError):
        return None


class LongRangeLoss(torch.nn.Module):
    r"""mace's loss plus optional dipole and charge terms on the blocks' outputs.

    .. math:: L = L_\mathrm{mace} + w_\mu \langle|\mu - \mu_\mathrm{ref}|^2\rangle
              + w_q \langle (q_i - q_{i,\mathrm{ref}})^2 \rangle

    For periodic structures the dipole (Ω P, e·Å) is compared at the minimum image modulo
    e·a_k along each periodic lattice vector (:func:`mace_lr.response.dipole_minimum_image`),
    so a reference on another polarization branch costs nothing.
    """

    def __init__(self, base_loss: torch.nn.Module, dipole_weight: float = 0.0, charges_weight: float = 0.0):
        super().__init__()
        self.base_loss = base_loss
        self.dipole_weight = float(dipole_weight)
        self.charges_weight = float(charges_weight)

    def forward(self, ref, pred, ddp: Optional[bool] = None) -> torch.Tensor:
        loss = (
            self.base_loss(ref=ref, pred=pred, ddp=ddp)
            if ddp is not None
            else self.base_loss(ref=ref, pred=pred)
        )
        if self.dipole_weight > 0:
            if pred.get("dipole") is None:
                raise RuntimeError("a dipole loss was requested but no block of this model predicts a dipole")
            delta = pred["dipole"] - ref["dipole"].view(-1, 3)
            # a periodic cell's dipole (Ω P) is defined modulo e·a_k: compare at the minimum image
            delta = dipole_minimum_image(delta, ref["cell"], _batch_value(ref, "pbc"))
            loss = loss + self.dipole_weight * torch.mean(delta**2)
        if self.charges_weight > 0:
            loss = loss + self.charges_weight * torch.mean((pred["charges"] - ref["charges"]) ** 2)
        return loss

    def __repr__(self) -> str:
        return (
            f"LongRangeLoss({self.base_loss!r}, dipole_weight={self.dipole_weight}, "
            f"charges_weight={self.charges_weight})"
        )


class _EpochSeededLoader:
    """Reseed the training loader's shuffling at every epoch from ``(seed, epoch)``.

    mace seeds the shuffling generator once, so a run restarted from a checkpoint sees
    a different batch order than the uninterrupted run. Seeding per epoch makes a
    restart continue exactly the same run.
    """

    def __init__(self, loader, seed: int, start_epoch: int):
        self._loader = loader
        self._seed = int(seed)
        self._epoch = int(start_epoch)

    def __iter__(self):
        self._loader.generator.manual_seed(self._seed * 100_003 + self._epoch)
        self._epoch += 1
        return iter(self._loader)

    def __len__(self) -> int:
        return len(self._loader)

    def __getattr__(self, name: str):
        return getattr(self._loader, name)


@contextlib.contextmanager
def _hooks(
    specs: Dict[str, Dict[str, Any]],
    carried: Optional[Dict[str, Any]],
    dipole_weight: float,
    charges_weight: float,
    seed: int,
):
    """Patch mace's run_train module for the duration of one run."""
    from mace.cli import run_train as rt

    from mace_lr import LongRangeMACE, augment

    orig_configure = rt.configure_model
    orig_params = rt.get_params_options
    orig_loss = rt.get_loss_fn
    orig_train = rt.tools.train

    def configure_model(*a, **k):
        model, output_args = orig_configure(*a, **k)
        if isinstance(model, LongRangeMACE):
            return model, output_args
        if carried:
            dtype = next(model.parameters()).dtype
            model = LongRangeMACE(model, {name: block.to(dtype) for name, block in carried.items()})
            logger.info("carried block(s) %s with their weights from the foundation model", list(carried))
        new = {n: c for n, c in specs.items() if not (carried and n in carried)}
        if new:
            model = augment(model, new)
        return model, output_args

    def get_params_options(args, model):
        if not isinstance(model, LongRangeMACE):
            return orig_params(args, model)
        options = orig_params(args, model.base)
        # mace passes some groups as generators (module.parameters()): materialise them
        # first, or collecting the ids below would exhaust them and leave those groups empty
        for group in options["params"]:
            group["params"] = list(group["params"])
        seen = {id(p) for group in options["params"] for p in group["params"]}
        for name, block in model.blocks.items():
            params = [p for p in block.parameters() if id(p) not in seen]
            options["params"].append(
                {"name": f"lr_{name}", "params": params, "weight_decay": 0.0, "lr": args.lr}
            )
            logger.info("optimiser group lr_%s: %d tensors", name, len(params))
        return options

    def get_loss_fn(*a, **k):
        base = orig_loss(*a, **k)
        if dipole_weight > 0 or charges_weight > 0:
            return LongRangeLoss(base, dipole_weight, charges_weight)
        return base

    loaded: Dict[str, int] = {}
    handler_cls = rt.tools.CheckpointHandler
    orig_load_latest = handler_cls.load_latest

    def load_latest(self, *a, **k):
        epoch = orig_load_latest(self, *a, **k)
        if epoch is not None and "train_started" not in loaded:
            loaded["epoch"] = int(epoch)
        return epoch

    def train(*a, **k):
        loaded["train_started"] = 1
        if "epoch" in loaded and k.get("start_epoch") == loaded["epoch"]:
            # mace's checkpoint of epoch e is written after epoch e finished; upstream
            # resumes at e and trains it twice. Continue with e + 1, as the run would have.
            k["start_epoch"] = loaded["epoch"] + 1
            logger.info("resuming after the completed epoch %d of the checkpoint", loaded["epoch"])
        loader = k.get("train_loader")
        if loader is not None and getattr(loader, "generator", None) is not None and not k.get("distributed"):
            k["train_loader"] = _EpochSeededLoader(loader, seed, k.get("start_epoch", 0))
        return orig_train(*a, **k)

    patches = [
        (rt, "configure_model", configure_model),
        (rt, "get_params_options", get_params_options),
        (rt, "get_loss_fn", get_loss_fn),
        (rt.tools, "train", train),
        (handler_cls, "load_latest", load_latest),
    ]
    with contextlib.ExitStack() as stack:
        for owner, attr, replacement in patches:
            stack.enter_context(mock.patch.object(owner, attr, replacement))
        yield


def _convert_outputs(args: argparse.Namespace) -> List[str]:
    """Rewrite the .model files mace saved (pickled) in mace-lr's safe format."""
    from mace_lr import LongRangeMACE, save

    written = []
    for suffix in ("", "_stagetwo"):
        path = os.path.join(args.model_dir, f"{args.name}{suffix}.model")
        if not os.path.exists(path):
            continue
        obj = torch.load(path, map_location="cpu", weights_only=False)  # written by this run
        if isinstance(obj, LongRangeMACE):
            save(obj, path)
            written.append(path)
            compiled = os.path.join(args.model_dir, f"{args.name}{suffix}_compiled.model")
            if os.path.exists(compiled):
                # the electrostatics engine runs in Python (neighbour lists, torch-pme), so
                # a TorchScript export of the whole model cannot be evaluated outside Python
                os.remove(compiled)
                logger.info("removed %s: TorchScript export of long-range models is not supported", compiled)
    return written


def run(args: argparse.Namespace, argv: Sequence[str]) -> List[str]:
    """Run one training; returns the mace-lr model files written."""
    from mace.cli import run_train as rt

    specs = parse_block_config(args.lr_blocks, args.lr_config)
    foundation = _read_foundation(args.foundation_model) if args.foundation_model else None
    preflight(args, argv, specs, foundation)
    carried = None
    tmpdir = None
    if foundation is not None:
        # mace loads foundation models with torch.load: give it the base MACE, keep the blocks
        tmpdir = tempfile.mkdtemp(prefix="mace_lr_foundation_")
        base_path = os.path.join(tmpdir, "base.model")
        torch.save(foundation.base, base_path)
        args.foundation_model = base_path
        carried = dict(foundation.blocks.items())
    dipole_weight = args.dipole_weight if _dipole_requested(argv) else 0.0
    with _hooks(specs, carried, dipole_weight, args.lr_charges_weight, args.seed):
        rt.run(args)
    return _convert_outputs(args)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Console entry point."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        written = run(args, argv)
    except (ValueError, KeyError) as exc:
        from mace_lr.registry import BlockRegistryError

        if isinstance(exc, (ValueError, BlockRegistryError)) or "block" in str(exc):
            parser.exit(2, f"mace_lr_run_train: error: {exc.args[0] if exc.args else exc}\n")
        raise
    for path in written:
        logging.info("mace-lr model written to %s", path)


if __name__ == "__main__":
    main()
