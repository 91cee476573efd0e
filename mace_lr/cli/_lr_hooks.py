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
        return data

    return classmethod(from_config)


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
        for name, block in model.blocks.items() if wrapped else []:
            params = [p for p in block.parameters() if id(p) not in seen]
            options["params"].append(
                {"name": f"lr_{name}", "params": params, "weight_decay": 0.0, "lr": args.lr}
            )
            logger.info("optimiser group lr_%s: %d tensors", name, len(params))
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
