"""Every mace symbol ``mace_lr_run_train`` replaces during a run, in one table.

mace's training script offers no hooks, so mace-lr swaps a few of its functions for the
duration of one run (:func:`patched`) and restores them afterwards; nothing is changed at
import time. Each :class:`Patch` names the mace symbol, why it is replaced, whether it is a
long-range hook (:mod:`._lr_hooks`) or a fix of mace's own behaviour (:mod:`._mace_fixes`,
to drop when mace changes), and the mace versions it was checked against. A mace release
touches this table, the hook or fix it breaks, and :mod:`mace_lr._mace_adapter` only.

Patches of the same symbol compose in table order: a later entry wraps the earlier ones.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from . import _lr_hooks as hooks
from . import _mace_fixes as fixes

#: mace-torch releases the table was checked against (the test suite runs on them).
MACE_CHECKED: Tuple[str, ...] = ("0.3.16",)


@dataclasses.dataclass(frozen=True)
class Patch:
    """One replaced mace symbol.

    Attributes:
        target: ``"module:attr"`` or ``"module:Class.attr"``.
        kind: ``"hook"`` (a long-range hook) or ``"fix"`` (works around a mace behaviour).
        reason: the mace behaviour changed, in one line.
        build: ``build(original, run) -> replacement``.
        checked: mace versions checked.
    """

    target: str
    kind: str
    reason: str
    build: Callable[[Any, "RunContext"], Any]
    checked: Tuple[str, ...] = MACE_CHECKED

    def owner(self) -> Tuple[Any, str]:
        module, _, path = self.target.partition(":")
        *classes, attr = path.split(".")
        owner: Any = importlib.import_module(module)
        for name in classes:
            owner = getattr(owner, name)
        return owner, attr


@dataclasses.dataclass
class RunContext:
    """What the hooks and fixes of one run share.

    Attributes:
        specs: ``{block: options}`` of ``--lr_blocks``/``--lr_config``.
        carried: blocks (with weights) carried over from a mace-lr foundation model.
        weights: loss term → weight (0: off).
        keys: loss term (and ``external_field``) → data key.
        seed: ``--seed``.
        batch_groups: ``--lr_batch_groups`` (atoms.info key of the batch groups), or None.
        state: ``rank`` of this process once mace has read it (0 without ``--distributed``).
    """

    specs: Dict[str, Dict[str, Any]]
    carried: Optional[Dict[str, Any]]
    weights: Dict[str, float]
    keys: Dict[str, str]
    seed: int
    batch_groups: Optional[str] = None
    state: Dict[str, Any] = dataclasses.field(default_factory=lambda: {"rank": 0})
    resume: Dict[str, int] = dataclasses.field(default_factory=dict)
    notes: List[str] = dataclasses.field(default_factory=list)
    on_exit: List[Callable[[], Any]] = dataclasses.field(default_factory=list)


_RT = "mace.cli.run_train"

PATCHES: Tuple[Patch, ...] = (
    # long-range hooks
    Patch(
        f"{_RT}:configure_model",
        "hook",
        "wrap the model mace builds with the blocks",
        hooks.configure_model_hook,
    ),
    Patch(f"{_RT}:get_params_options", "hook", "one optimiser group per block", hooks.block_params_hook),
    Patch(f"{_RT}:get_loss_fn", "hook", "add the long-range loss terms", hooks.loss_hook),
    Patch(f"{_RT}:inject_LoRAs", "hook", "LoRA on the base model only", hooks.lora_hook),
    Patch(f"{_RT}:update_keyspec_from_kwargs", "hook", "read field and targets", hooks.keyspec_hook),
    Patch(
        "mace.data.atomic_data:AtomicData.from_config", "hook", "batchable targets", hooks.target_shapes_hook
    ),
    Patch(f"{_RT}:init_distributed", "hook", "record the rank, quiet other ranks", hooks.rank_hook),
    Patch(
        "mace.tools.torch_geometric.dataloader:DataLoader",
        "hook",
        "training batches of whole groups (--lr_batch_groups)",
        hooks.group_batches_hook,
    ),
    # fixes of mace's own training loop
    Patch(
        f"{_RT}:get_params_options",
        "fix",
        "parameters outside every optimiser group accumulate gradients that enter the clipping",
        fixes.freeze_outside_optimiser_fix,
    ),
    Patch(
        "mace.tools:train", "fix", "the shuffling is seeded once, not per epoch", fixes.epoch_reseeding_fix
    ),
    Patch(
        "mace.tools:CheckpointHandler.load_latest",
        "fix",
        "remember the checkpoint's epoch for the resume fix",
        fixes.record_checkpoint_epoch,
    ),
    Patch(
        "mace.tools:train", "fix", "a resumed run trains the checkpoint's epoch twice", fixes.resume_epoch_fix
    ),
    Patch(f"{_RT}:init_distributed", "fix", "no process group for --device cpu", fixes.cpu_process_group_fix),
    Patch(f"{_RT}:DDP", "fix", "device_ids passed for CPU modules", fixes.cpu_ddp_fix),
)


@contextlib.contextmanager
def patched(run: RunContext, patches: Sequence[Patch] = PATCHES) -> Iterator[RunContext]:
    """Apply ``patches`` for the duration of the ``with`` block, then restore every symbol."""
    undo: List[Tuple[Any, str, Any, bool]] = []
    try:
        for patch in patches:
            owner, attr = patch.owner()
            original = inspect.getattr_static(owner, attr)  # classmethods stay descriptors
            undo.append((owner, attr, original, attr in vars(owner)))
            setattr(owner, attr, patch.build(original, run))
        yield run
    finally:
        for owner, attr, original, own in reversed(undo):
            if own:
                setattr(owner, attr, original)
            else:
                delattr(owner, attr)
        for callback in reversed(run.on_exit):
            callback()
