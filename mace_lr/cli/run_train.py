"""``mace_lr_run_train``: mace's ``mace_run_train`` plus long-range blocks.

Every ``mace_run_train`` flag keeps its meaning; the training loop, data pipeline,
checkpoints, EMA, SWA/stage two, LoRA, freezing and ``--distributed`` are mace's own.
mace-lr adds ``--lr_blocks`` and ``--lr_config`` (:mod:`._options`), checks the run before
it starts (:mod:`._preflight`), and replaces a few of mace's functions for the duration of
the run, all listed in one table (:mod:`._mace_patches`): the long-range hooks
(:mod:`._lr_hooks`: the model mace builds is wrapped with :func:`mace_lr.augment`, or
carries the blocks of a mace-lr foundation model; every block parameter reaches the
optimiser; the applied field and the long-range targets reach the batch and the loss,
:class:`mace_lr._losses.LongRangeLoss`) and fixes of mace's own training loop
(:mod:`._mace_fixes`: resume epoch, per-epoch reseeding, parameters outside the optimiser
groups, ``--distributed`` on CPU with a ``gloo`` group).

At the end the ``.model`` files mace wrote are rewritten in mace-lr's safe format, which
``mace_lr.load`` and ``MACELRCalculator`` read.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import tempfile
from typing import Any, Dict, Iterator, List, Optional, Sequence

import mace  # noqa: F401  (before e3nn)
import torch

from .._losses import LongRangeLoss
from ._mace_patches import RunContext, patched
from ._options import build_parser, import_plugin_modules, loss_weights, parse_block_config, target_keys
from ._preflight import preflight, read_foundation

__all__ = [
    "LongRangeLoss",
    "build_parser",
    "loss_weights",
    "main",
    "parse_block_config",
    "run",
    "target_keys",
]

logger = logging.getLogger(__name__)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Console entry point."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        import_plugin_modules(argv)
    except ValueError as exc:
        build_parser().exit(2, f"mace_lr_run_train: error: {exc}\n")
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


def run(args: argparse.Namespace, argv: Sequence[str]) -> List[str]:
    """Run one training; returns the mace-lr model files written."""
    from mace.cli import run_train as rt

    specs = parse_block_config(args.lr_blocks, args.lr_config)
    foundation = read_foundation(args.foundation_model) if args.foundation_model else None
    weights = loss_weights(args, argv)
    preflight(args, weights, specs, foundation)
    carried = None
    tmpdir = None
    if foundation is not None:
        # mace loads foundation models with torch.load: give it the base MACE, keep the blocks
        tmpdir = tempfile.mkdtemp(prefix="mace_lr_foundation_")
        base_path = os.path.join(tmpdir, "base.model")
        torch.save(foundation.base, base_path)
        args.foundation_model = base_path
        carried = dict(foundation.blocks.items())
    with _hooks(specs, carried, weights, target_keys(args), args.seed, args.lr_batch_groups) as state:
        rt.run(args)
    if state["rank"] != 0:
        # mace saves the .model files on rank 0 before its last barrier; rank 0 rewrites them
        return []
    return _convert_outputs(args)


@contextlib.contextmanager
def _hooks(
    specs: Dict[str, Dict[str, Any]],
    carried: Optional[Dict[str, Any]],
    weights: Dict[str, float],
    keys: Dict[str, str],
    seed: int,
    batch_groups: Optional[str] = None,
) -> Iterator[Dict[str, Any]]:
    """Patch mace's training run for the duration of one run (:data:`._mace_patches.PATCHES`).

    ``weights`` are the loss terms (:func:`loss_weights`); ``keys`` map targets and the
    applied field to the data keys holding them (:func:`target_keys`). Yields a dict
    that holds this process's ``rank`` once mace has read it (0 without ``--distributed``).
    """
    with patched(RunContext(specs, carried, weights, keys, seed, batch_groups)) as run_context:
        yield run_context.state


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
                _export_compiled(obj, compiled)
    return written


def _export_compiled(model, path: str) -> None:
    """Replace mace's ``*_compiled.model`` by the TorchScript form of ``model.deployable()``.

    mace scripts the trained model as it is; its blocks' default engines call Python
    (neighbour lists, torch-pme), so that file could not run outside Python. The
    deployable copy runs every block on the graph engine (same weights; periodic sums at
    each block's accuracy) and saves without callbacks. Blocks that cannot script yet
    leave no compiled file, with a warning that says why.
    """
    try:
        scripted = torch.jit.script(model.deployable().eval())
        torch.jit.save(scripted, path)
    except Exception as exc:  # TorchScript raises many error types; none may end the run
        if os.path.exists(path):
            os.remove(path)
        logger.warning(
            "no TorchScript export %s: %s: %s (the .model file is complete; see the README, "
            "'Deploy with TorchScript')",
            path,
            type(exc).__name__,
            str(exc).splitlines()[0] if str(exc) else "",
        )
        return
    logger.info("wrote %s: TorchScript of model.deployable() (graph electrostatics engine)", path)


if __name__ == "__main__":
    main()
