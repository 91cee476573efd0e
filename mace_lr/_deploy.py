"""Pieces of :class:`~mace_lr.LongRangeMACE`'s forward, and what its TorchScript form reads (private).

Scripted code cannot read the blocks' declarations (:class:`~mace_lr.Input`,
:class:`~mace_lr.Output` dataclasses): the wrapper stores them as plain lists when it is
built (:func:`input_specs`, :func:`merge_plan`) and its scripted forward uses
:func:`merge_planned`, the TorchScript twin of the eager :func:`merge_declared`.
:func:`deployable_copy` switches every block that has a ``method`` to the graph engine
(:func:`mace_lr.electrostatics.coulomb_potential_graph`), the one that scripts without
Python callbacks.
"""

import copy
from typing import Dict, Iterable, List, Optional, Tuple

import mace  # noqa: F401  (before e3nn)
import torch

from ._outputs import PER_ATOM, Input, declared_outputs

#: (key, per atom, int64, default) of one declared input
InputSpec = Tuple[str, bool, bool, float]
#: (block name, result key, output name, summed, mask key or "", mask output name or "")
MergeStep = Tuple[str, str, str, bool, str, str]


def input_specs(inputs: Iterable[Input]) -> List[InputSpec]:
    """The declared inputs as TorchScript-readable tuples."""
    return [(i.key, i.per == PER_ATOM, i.dtype == "int64", float(i.default)) for i in inputs]


def merge_plan(blocks: Dict[str, object]) -> List[MergeStep]:
    """Where each block's declared outputs go in the model's output, block after block."""
    plan: List[MergeStep] = []
    for name, block in blocks.items():
        for key, output in declared_outputs(block).items():
            plan.append((name, key, output.name, output.summed, output.mask or "", output.mask_output or ""))
    return plan


def merge_planned(
    out: Dict[str, Optional[torch.Tensor]],
    given_by: Dict[str, str],
    name: str,
    result: Dict[str, torch.Tensor],
    plan: List[MergeStep],
) -> None:
    """Put the declared outputs of block ``name``'s ``result`` under their declared names."""
    for block_name, key, output_name, summed, mask, mask_output in plan:
        if block_name != name or key not in result:
            continue
        value = result[key]
        previous = out.get(output_name)
        if output_name in given_by and previous is not None:
            if not summed:
                first = given_by[output_name]
                raise RuntimeError("blocks " + first + " and " + name + " both predict " + output_name)
            out[output_name] = previous + value
        else:
            out[output_name] = value
            given_by[output_name] = name
        if mask != "":
            out[mask_output] = result[mask]


def or_zeros(grad: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """``grad``, or zeros shaped as ``like`` where autograd found no dependence."""
    if grad is None:
        return torch.zeros_like(like)
    return grad


def merge_declared(
    out: Dict[str, Optional[torch.Tensor]],
    given_by: Dict[str, str],
    name: str,
    block: torch.nn.Module,
    result: Dict[str, torch.Tensor],
) -> None:
    """Put the declared outputs of one block's ``result`` under their declared names."""
    for key, output in declared_outputs(block).items():
        if key not in result:
            continue
        value = result[key]
        if output.name in given_by:
            if not output.summed:
                first = given_by[output.name]
                raise RuntimeError(f"blocks {first!r} and {name!r} both predict {output.what}")
            out[output.name] = out[output.name] + value
        else:
            out[output.name] = value
            given_by[output.name] = name
        if output.mask is not None:
            out[output.mask_output] = result[output.mask]


def field_derivatives(
    dipole: torch.Tensor, positions: torch.Tensor, field: torch.Tensor, training: bool
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Born charges ``Z[i, α, β] = ∂μ_α/∂R_iβ`` [N, 3, 3] e and polarizability
    ``∂μ_α/∂ℰ_β`` [G, 3, 3] e·Å²/V, one backward pass per field direction α.
    """
    bec = torch.zeros((positions.shape[0], 3, 3), dtype=positions.dtype, device=positions.device)
    pol = torch.zeros((field.shape[0], 3, 3), dtype=positions.dtype, device=positions.device)
    for alpha in range(3):
        if not dipole.requires_grad:  # nothing depends on the field
            break
        ones: List[Optional[torch.Tensor]] = [torch.ones_like(dipole[:, alpha].sum())]
        g = torch.autograd.grad(
            [dipole[:, alpha].sum()],
            [positions, field],
            grad_outputs=ones,
            retain_graph=True,
            create_graph=training,
            allow_unused=True,
        )
        g_pos, g_field = g[0], g[1]
        if g_pos is not None:
            bec[:, alpha, :] = g_pos
        if g_field is not None:
            pol[:, alpha, :] = g_field
    return bec, pol


def deployable_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of a LongRangeMACE whose blocks with a ``method`` option use ``method="graph"``.

    Each such block is rebuilt from its configuration with the graph engine and given the
    same weights; other blocks are copied as they are. The base model is compiled the way
    mace compiles its models (``e3nn.util.jit.compile``: e3nn's traced modules traced,
    the rest scripted), so that ``torch.jit.script`` of the copy works directly.
    """
    from e3nn.util import jit

    from ._model import LongRangeMACE

    base = copy.deepcopy(model.base)
    if not isinstance(base, torch.jit.ScriptModule):
        base = jit.compile(base)

    blocks = {}
    for name, block in model.blocks.items():
        config = block.to_config() if hasattr(block, "to_config") else {}
        if "method" in config and config["method"] != "graph":
            config["method"] = "graph"
            new = type(block).from_config(config)
            param = next(block.parameters(), None)
            if param is not None:
                new = new.to(dtype=param.dtype, device=param.device)
            new.load_state_dict(block.state_dict())
            blocks[name] = new
        else:
            blocks[name] = copy.deepcopy(block)
    return LongRangeMACE(base, blocks)
