"""Work-arounds for behaviours of mace's own training loop (not long-range specific).

Each ``*_fix`` builds the replacement of one mace symbol from the original; the table in
:mod:`mace_lr.cli._mace_patches` names the symbol, the mace behaviour worked around and
the mace versions checked, so a fix can be dropped when mace changes that behaviour.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable

import torch

if TYPE_CHECKING:
    from ._mace_patches import RunContext

logger = logging.getLogger(__name__)


def freeze_outside_optimiser_fix(original: Callable, run: "RunContext") -> Callable:
    """``get_params_options``: stop gradients of trainable parameters no optimiser group holds.

    mace's groups leave some parameters out (e.g. trainable Bessel weights of the radial
    basis). They are never updated, but mace zeroes only the optimiser's gradients, so
    theirs accumulate over the whole run and enter ``clip_grad_norm_`` over all model
    parameters: the clipping then depends on how many steps this process has run, and a
    restart from a checkpoint diverges from the uninterrupted run at the first clipped step.
    """

    def get_params_options(args, model):
        options = original(args, model)
        # mace passes some groups as generators (module.parameters()): materialise them
        # first, or collecting the ids below would exhaust them and leave those groups empty
        for group in options["params"]:
            group["params"] = list(group["params"])
        in_optimizer = {id(p) for group in options["params"] for p in group["params"]}
        frozen = []
        for name, p in model.named_parameters():
            if p.requires_grad and id(p) not in in_optimizer:
                p.requires_grad_(False)
                frozen.append(name)
        if frozen:
            logger.info("parameters outside every optimiser group get no gradient: %s", ", ".join(frozen))
        return options

    return get_params_options


class _EpochSeededLoader:
    """Reseed the training loader's shuffling at every epoch from ``(seed, epoch)``."""

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


def epoch_reseeding_fix(original: Callable, run: "RunContext") -> Callable:
    """``tools.train``: reseed the shuffling of the training loader at every epoch.

    mace seeds the shuffling generator once, so a run restarted from a checkpoint sees a
    different batch order than the uninterrupted run. Seeding per epoch from
    ``(--seed, epoch)`` makes a restart continue exactly the same run. Under DDP mace's
    ``DistributedSampler.set_epoch`` already does this (2 CPU ranks, 3 epochs straight vs
    2 + ``--restart_latest``: identical checkpoints), so distributed loaders are left alone.
    """

    def train(*a, **k):
        loader = k.get("train_loader")
        if loader is not None and getattr(loader, "generator", None) is not None and not k.get("distributed"):
            k["train_loader"] = _EpochSeededLoader(loader, run.seed, k.get("start_epoch", 0))
        return original(*a, **k)

    return train


def record_checkpoint_epoch(original: Callable, run: "RunContext") -> Callable:
    """``CheckpointHandler.load_latest``: remember the epoch of the checkpoint resumed from
    (read by :func:`resume_epoch_fix`).
    """

    def load_latest(self, *a, **k):
        epoch = original(self, *a, **k)
        if epoch is not None and "train_started" not in run.resume:
            run.resume["epoch"] = int(epoch)
        return epoch

    return load_latest


def resume_epoch_fix(original: Callable, run: "RunContext") -> Callable:
    """``tools.train``: resume after the checkpoint's epoch, not at it.

    mace's checkpoint of epoch e is written after epoch e finished; upstream resumes at e
    and trains it twice. Continue with e + 1, as the uninterrupted run would have.
    """

    def train(*a, **k):
        run.resume["train_started"] = 1
        if "epoch" in run.resume and k.get("start_epoch") == run.resume["epoch"]:
            k["start_epoch"] = run.resume["epoch"] + 1
            logger.info("resuming after the completed epoch %d of the checkpoint", run.resume["epoch"])
        return original(*a, **k)

    return train


def cpu_process_group_fix(original: Callable, run: "RunContext") -> Callable:
    """``init_distributed``: start a ``gloo`` process group for ``--distributed --device cpu``.

    mace initialises a process group only for ``--device cuda`` (nccl) and ``xpu`` (ccl).
    With ``--device cpu`` a ``gloo`` group is initialised (``init_method="env://"``) right
    after mace has read the rank, so the same ``torchrun`` command trains on CPU nodes.
    """

    def init_distributed(args):
        rank, local_rank, world_size = original(args)
        if args.distributed and args.launcher != "none" and not torch.distributed.is_initialized():
            if args.device == "cpu":
                torch.distributed.init_process_group(
                    backend="gloo", init_method="env://", rank=rank, world_size=world_size
                )
                # mace's logger is set up after this call: say it when the model is wrapped
                run.notes.append(
                    f"gloo process group initialised for --device cpu (rank {rank} of {world_size})"
                )
        return rank, local_rank, world_size

    return init_distributed


def cpu_ddp_fix(original: Callable, run: "RunContext") -> Callable:
    """``DDP``: wrap CPU modules without ``device_ids``.

    mace wraps the model as ``DDP(model, device_ids=[local_rank])``, which is meant for one
    accelerator per process. DDP runs with ``find_unused_parameters=False`` (mace's choice):
    a block parameter multiplied by a zero coupling (a fresh LES block) is still in the
    graph and gets a zero gradient, which DDP reduces like any other; only parameters that
    no forward pass reaches would need the flag.
    """

    def ddp(module, *a: Any, **k: Any):
        while run.notes:
            logger.info(run.notes.pop(0))
        if all(p.device.type == "cpu" for p in module.parameters()):
            k.pop("device_ids", None)
            logger.info("DistributedDataParallel on CPU: model wrapped without device_ids")
        return original(module, *a, **k)

    return ddp
