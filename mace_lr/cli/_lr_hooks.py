"""The long-range hooks into mace's training run: where mace-lr changes what mace does.

Each ``*_hook`` builds the replacement of one mace symbol from the original (the table in
:mod:`mace_lr.cli._mace_patches` lists them with the mace versions checked):

* model construction: the model mace builds is wrapped with :func:`mace_lr.augment`
  (identity at initialisation), or carries the blocks of a mace-lr foundation model;
* parameter groups: every block parameter is added to the optimiser, with mace's groups
  built on the base model only; LoRA adapts the base model only;
* the data and the loss: the applied field and the long-range targets reach the batch in
  batchable shapes, and :class:`mace_lr._losses.LongRangeLoss` adds their terms.
"""

from __future__ import annotations

import logging
import zlib
from typing import TYPE_CHECKING, Callable, Dict, Tuple

import numpy as np
import torch

from .._keys import (
    BORN_CHARGES,
    BORN_EFFECTIVE_CHARGES,
    DIPOLE,
    EXTERNAL_FIELD,
    POLARIZABILITY,
    POLARIZATION,
    PRESENT_SUFFIX,
)
from .._losses import LongRangeLoss
from .._outputs import PER_ATOM, Input, Output, declared_inputs, declared_targets

if TYPE_CHECKING:
    from ._mace_patches import RunContext

logger = logging.getLogger(__name__)

#: loss term → model output the training forward must compute
_RESPONSES = {BORN_CHARGES: BORN_EFFECTIVE_CHARGES, POLARIZABILITY: POLARIZABILITY}


def training_responses(weights) -> Tuple[str, ...]:
    """Field responses every training forward pass must compute for the loss terms."""
    responses = tuple(_RESPONSES[name] for name in _RESPONSES if weights.get(name, 0.0) > 0)
    if weights.get(POLARIZATION, 0.0) > 0:
        responses += (DIPOLE,)  # the full −∂U/∂E, not the blocks' own dipoles
    return responses


def _declared_data_targets(weights) -> Dict[str, Output]:
    """Declared targets of the run whose data mace-lr reads (not mace's own keys)."""
    return {
        name: output
        for name, (output, _) in declared_targets().items()
        if weights.get(name, 0.0) > 0 and output.target.default_key is not None
    }


def _run_inputs(run: "RunContext") -> Tuple[Input, ...]:
    """Inputs the run's blocks declare (:attr:`LongRangeBlock.inputs`), each key once."""
    from mace_lr.registry import get_block

    classes = [get_block(name) for name in run.specs]
    classes += [type(block) for block in (run.carried or {}).values()]
    return tuple(declared_inputs(classes))


def keyspec_hook(original: Callable, run: "RunContext") -> Callable:
    """``update_keyspec_from_kwargs``: read the applied field, the long-range targets and the
    inputs the blocks declare (e.g. formal charges, electrode labels).
    """
    weights, keys = run.weights, run.keys
    declared = _declared_data_targets(weights)
    inputs = _run_inputs(run)

    def update_keyspec_from_kwargs(keyspec, keydict):
        keyspec = original(keyspec, keydict)
        info = {EXTERNAL_FIELD: keys[EXTERNAL_FIELD]}
        if weights.get(POLARIZATION, 0.0) > 0:
            info[POLARIZATION] = keys[POLARIZATION]
        arrays = {BORN_CHARGES: keys[BORN_CHARGES]} if weights.get(BORN_CHARGES, 0.0) > 0 else {}
        for name, output in declared.items():
            (arrays if output.per == PER_ATOM else info)[name] = keys[name]
        for item in inputs:
            (arrays if item.per == PER_ATOM else info)[item.key] = item.source
        if run.batch_groups:
            info[BATCH_GROUP] = run.batch_groups
        return keyspec.update(info_keys=info, arrays_keys=arrays)

    return update_keyspec_from_kwargs


def target_shapes_hook(original, run: "RunContext"):
    """``AtomicData.from_config``: give the long-range targets batchable shapes.

    mace passes extra properties through with their stored shapes (a 3-vector becomes
    [3, 1], which batches wrongly) and skips missing ones (batches of mixed structures
    would not collate): reshape them, zeros where missing.
    """
    weights = run.weights
    declared = _declared_data_targets(weights)
    inputs = _run_inputs(run)
    orig_from_config = original.__func__

    def from_config(cls, config, *a, **k):
        data = orig_from_config(cls, config, *a, **k)
        dtype = torch.get_default_dtype()
        n = len(config.atomic_numbers)
        if weights.get(BORN_CHARGES, 0.0) > 0:
            z = config.properties.get(BORN_CHARGES)
            data.born_charges = (
                torch.zeros(n, 3, 3, dtype=dtype) if z is None else torch.tensor(z, dtype=dtype).view(n, 3, 3)
            )
        if weights.get(POLARIZATION, 0.0) > 0:
            p = config.properties.get(POLARIZATION)
            data.polarization = (
                torch.zeros(1, 3, dtype=dtype) if p is None else torch.tensor(p, dtype=dtype).view(1, 3)
            )
        for name, output in declared.items():
            rows = n if output.per == PER_ATOM else 1
            value = config.properties.get(name)
            shape = (rows, *output.shape)
            value = (
                torch.full(shape, float("nan"), dtype=dtype)
                if value is None
                else torch.tensor(value, dtype=dtype)
            )
            value = value.view(shape)
            # rows without a reference (NaN) are masked out of the loss
            present = torch.isfinite(value.view(rows, -1)).all(-1)
            expand = present.view(rows, *([1] * len(output.shape)))
            setattr(data, name, torch.where(expand, value, torch.zeros_like(value)))
            setattr(data, name + PRESENT_SUFFIX, present.to(dtype))
        for item in inputs:  # declared inputs, the input's default where a structure lacks it
            rows = n if item.per == PER_ATOM else 1
            kind = torch.int64 if item.dtype == "int64" else dtype
            value = config.properties.get(item.key)
            value = (
                torch.full((rows,), item.default, dtype=kind)
                if value is None
                else torch.as_tensor(np.asarray(value, dtype=float), dtype=torch.float64).to(kind)
            )
            setattr(data, item.key, value.view(rows))
        if run.batch_groups:  # the structure's group label as an integer (-1: none)
            label = config.properties.get(BATCH_GROUP)
            data.lr_batch_group = torch.tensor([-1 if label is None else group_id(label)], dtype=torch.int64)
        return data

    return classmethod(from_config)


#: batch (and keyspec) key of the ``--lr_batch_groups`` label
BATCH_GROUP = "lr_batch_group"


def group_id(label) -> int:
    """A non-negative integer for a group label (integers as they are, other labels hashed)."""
    value = np.asarray(label).reshape(-1)
    if value.size == 1 and np.issubdtype(value.dtype, np.integer) and int(value[0]) >= 0:
        return int(value[0])
    return zlib.crc32(str(label).encode()) + (1 << 40)  # apart from the integer labels


class GroupBatchSampler(torch.utils.data.Sampler):
    """Batches of whole groups: the groups in a random order (from ``generator``, which
    mace-lr reseeds every epoch), packed into batches of at most ``batch_size`` structures;
    a group larger than that is one batch. Structures with label −1 are groups of one.
    """

    def __init__(self, labels, batch_size: int, generator=None) -> None:
        groups: Dict[int, list] = {}
        for index, label in enumerate(labels):
            groups.setdefault(int(label) if label >= 0 else -1 - index, []).append(index)
        self.groups = list(groups.values())
        self.batch_size = int(batch_size)
        self.generator = generator

    def _batches(self, order):
        batch: list = []
        for g in order:
            members = self.groups[g]
            if batch and len(batch) + len(members) > self.batch_size:
                yield batch
                batch = []
            batch = batch + members
        if batch:
            yield batch

    def __iter__(self):
        order = torch.randperm(len(self.groups), generator=self.generator).tolist()
        return self._batches(order)

    def __len__(self) -> int:
        return sum(1 for _ in self._batches(range(len(self.groups))))


def group_batches_hook(original, run: "RunContext"):
    """``torch_geometric.dataloader.DataLoader``: with ``--lr_batch_groups``, a shuffled
    loader yields batches of whole groups (:class:`GroupBatchSampler`); every other loader,
    and every loader without the flag, is mace's own.
    """

    def DataLoader(dataset, batch_size: int = 1, shuffle: bool = False, **kwargs):
        if not (run.batch_groups and shuffle and kwargs.get("sampler") is None):
            return original(dataset, batch_size=batch_size, shuffle=shuffle, **kwargs)
        labels = [int(getattr(data, BATCH_GROUP, torch.tensor([-1])).view(-1)[0]) for data in dataset]
        sampler = GroupBatchSampler(labels, batch_size, kwargs.get("generator"))
        kwargs.pop("sampler", None)
        kwargs.pop("drop_last", None)
        logger.info(
            "training batches of whole groups of atoms.info[%r]: %d groups, %d batches of <= %d structures",
            run.batch_groups,
            len(sampler.groups),
            len(sampler),
            batch_size,
        )
        return original(dataset, batch_size=1, shuffle=False, batch_sampler=sampler, **kwargs)

    return DataLoader


def configure_model_hook(original: Callable, run: "RunContext") -> Callable:
    """``configure_model``: attach the blocks to the model mace built (or loaded)."""
    from mace_lr import LongRangeMACE, augment

    responses = training_responses(run.weights)

    def configure_model(*a, **k):
        model, output_args = original(*a, **k)
        if isinstance(model, LongRangeMACE):
            return model, output_args
        carried = run.carried
        if carried:
            dtype = next(model.parameters()).dtype
            model = LongRangeMACE(model, {name: block.to(dtype) for name, block in carried.items()})
            logger.info("carried block(s) %s with their weights from the foundation model", list(carried))
        new = {n: c for n, c in run.specs.items() if not (carried and n in carried)}
        if new:
            model = augment(model, new)
        if responses:
            model.training_responses = responses
            logger.info("every training forward pass computes %s", ", ".join(responses))
        return model, output_args

    return configure_model


def block_params_hook(original: Callable, run: "RunContext") -> Callable:
    """``get_params_options``: mace's groups for the base model plus one group per block.

    mace's groups only know its own modules (a silent trap upstream: block parameters
    never trained); ``--freeze`` acts on the base model only, so the blocks train in full.
    """
    from mace_lr import LongRangeMACE

    def get_params_options(args, model):
        wrapped = isinstance(model, LongRangeMACE)
        options = original(args, model.base if wrapped else model)
        for group in options["params"]:
            group["params"] = list(group["params"])  # mace passes some groups as generators
        seen = {id(p) for group in options["params"] for p in group["params"]}
        block_lr = args.lr if getattr(args, "lr_block_lr", None) is None else float(args.lr_block_lr)
        for name, block in model.blocks.items() if wrapped else []:
            params = [p for p in block.parameters() if id(p) not in seen]
            options["params"].append(
                {"name": f"lr_{name}", "params": params, "weight_decay": 0.0, "lr": block_lr}
            )
            logger.info("optimiser group lr_%s: %d tensors, lr %g", name, len(params), block_lr)
            seen.update(id(p) for p in params)
        return options

    return get_params_options


def loss_hook(original: Callable, run: "RunContext") -> Callable:
    """``get_loss_fn``: mace's loss plus the long-range terms the run asked for."""
    weights = run.weights

    def get_loss_fn(*a, **k):
        base = original(*a, **k)
        if any(w > 0 for w in weights.values()):
            return LongRangeLoss(base, **{f"{name}_weight": w for name, w in weights.items()})
        return base

    return get_loss_fn


def lora_hook(original: Callable, run: "RunContext") -> Callable:
    """``inject_LoRAs``: LoRA adapts the foundation model; the blocks are new and train in
    full (wrapped, their scalar parameters, e.g. the LES coupling, would stay frozen at zero).
    """
    from mace_lr import LongRangeMACE

    def inject_LoRAs(model, *a, **k):
        if not isinstance(model, LongRangeMACE):
            return original(model, *a, **k)
        model.base = original(model.base, *a, **k)
        logger.info("LoRA injected into the base model; long-range blocks train all their parameters")
        return model

    return inject_LoRAs


def rank_hook(original: Callable, run: "RunContext") -> Callable:
    """``init_distributed``: record this process's rank (only rank 0 converts the model
    files) and quiet mace-lr's loggers on the other ranks.

    mace silences non-zero ranks with a filter on the root logger, which records of named
    loggers bypass (``"__main__"`` is the entry point under ``python -m``).
    """

    def init_distributed(args):
        rank, local_rank, world_size = original(args)
        run.state["rank"] = rank
        if rank != 0:
            levels = {name: logging.getLogger(name).level for name in ("mace_lr", "__main__")}
            for name in levels:
                logging.getLogger(name).setLevel(logging.WARNING)
            run.on_exit.append(lambda: [logging.getLogger(n).setLevel(v) for n, v in levels.items()])
        return rank, local_rank, world_size

    return init_distributed
