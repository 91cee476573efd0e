"""What a block declares: its outputs (units, names, training targets) and its inputs.

The wrapper, the calculator, ``mace_lr_eval_configs`` and ``mace_lr_run_train`` read these
declarations; none of them knows a block by name. A block lists its outputs in
:attr:`mace_lr.LongRangeBlock.outputs`; ``charges`` (per atom, e, summed over the blocks)
is declared for every block (:data:`STANDARD_OUTPUTS`) and a block may redeclare it (to
describe its charges or make them a training target).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

#: ``Output.per`` values
PER_ATOM = "atom"
PER_STRUCTURE = "structure"
#: ``Target.loss`` values: mean squared error, plain or at the minimum image of the cell
#: (for positions in periodic cells, e.g. centroids)
MSE = "mse"
MSE_MINIMUM_IMAGE = "mse_minimum_image"


@dataclasses.dataclass(frozen=True)
class Target:
    """A training target for an :class:`Output` (a loss term of ``mace_lr_run_train``).

    The term is ``weight · mean((prediction − reference)²)`` over the components of the
    atoms (or structures) that have both a prediction and a reference (NaN rows of a
    per-atom reference are left out).

    Attributes:
        weight_flag: command-line flag of the weight without dashes (e.g.
            ``"wannier_centroids_weight"``); default 0 (term off).
        key_flag: flag of the data key (e.g. ``"wannier_centroids_key"``); when mace already
            has that flag (``"charges_key"``), mace's is used.
        default_key: default of ``key_flag`` (``atoms.arrays`` for per-atom outputs,
            ``atoms.info`` for per-structure ones); ignored for mace's own flags.
        loss: :data:`MSE` or :data:`MSE_MINIMUM_IMAGE`.
        help: help text of the weight flag.
    """

    weight_flag: str
    key_flag: str
    default_key: Optional[str] = None
    loss: str = MSE
    help: str = ""

    def __post_init__(self) -> None:
        if self.loss not in (MSE, MSE_MINIMUM_IMAGE):
            raise ValueError(f"Target.loss must be {MSE!r} or {MSE_MINIMUM_IMAGE!r}, got {self.loss!r}")


@dataclasses.dataclass(frozen=True)
class Output:
    """One quantity a block returns besides its energy.

    Attributes:
        key: key in the block's result dictionary.
        per: :data:`PER_ATOM` ([n_atoms, *shape]) or :data:`PER_STRUCTURE` ([n_graphs, *shape]).
        unit: unit of the values (e.g. ``"e"``, ``"Å"``).
        name: name in the model's output and the calculator's results (ASE's name where ASE
            has one); ``mace_lr_eval_configs`` writes it with its prefix.
        shape: trailing shape of one atom's (structure's) value, ``()`` for a scalar.
        description: what the values are, in a few words (used in messages).
        mask: key of a [n_atoms] bool result marking the atoms that carry a value (the
            others are NaN in the calculator's results); per-atom outputs only.
        mask_name: model output name of ``mask`` (default ``name + "_mask"``).
        summed: several blocks may return it and the model reports the sum (charges);
            otherwise two blocks returning it is an error.
        target: the training target, if the output may be fitted to reference data.
    """

    key: str
    per: str
    unit: str
    name: str
    shape: Tuple[int, ...] = ()
    description: str = ""
    mask: Optional[str] = None
    mask_name: Optional[str] = None
    summed: bool = False
    target: Optional[Target] = None

    def __post_init__(self) -> None:
        if self.per not in (PER_ATOM, PER_STRUCTURE):
            raise ValueError(f"Output.per must be {PER_ATOM!r} or {PER_STRUCTURE!r}, got {self.per!r}")
        if self.mask is not None and self.per != PER_ATOM:
            raise ValueError(f"output {self.name!r}: a mask needs a per-atom output")

    @classmethod
    def charges(cls, description: str = "charges", target: Optional["Target"] = None) -> "Output":
        """The standard ``charges`` output (per atom, e, summed over the blocks), described
        for one block (e.g. ``"latent charges"``), optionally a training target.
        """
        return cls("charges", PER_ATOM, "e", "charges", description=description, summed=True, target=target)

    @property
    def mask_output(self) -> Optional[str]:
        """Model output name of the mask (None without one)."""
        if self.mask is None:
            return None
        return self.mask_name or f"{self.name}_mask"

    @property
    def what(self) -> str:
        return self.description or self.name


@dataclasses.dataclass(frozen=True)
class Input:
    """A per-atom or per-structure input a block reads from the data (beyond the standard
    context of :data:`mace_lr._block.CONTEXT_KEYS`).

    ``atoms_to_batch`` (calculator, contract tests) and ``mace_lr_run_train``'s data
    pipeline read it from ``atoms.arrays[source]`` (per atom) or ``atoms.info[source]`` (per
    structure), and the wrapper puts it in ``ctx[key]``, filled with ``default`` where a
    structure lacks it (a block that cannot do without it lists the key in
    ``required_inputs``: then a missing value is an error).

    Attributes:
        key: context (and batch) key.
        per: :data:`PER_ATOM` or :data:`PER_STRUCTURE`.
        unit: unit of the values (``""`` for labels).
        source: ``atoms.arrays`` / ``atoms.info`` key.
        dtype: ``"float"`` (the model's dtype) or ``"int64"``.
        default: value where the data lack it.
        description: what the values are.
        check: ``check(atoms, index)`` raising a clear error for a bad structure.
    """

    key: str
    per: str
    unit: str
    source: str
    dtype: str = "float"
    default: float = 0.0
    description: str = ""
    check: Optional[Callable[[Any, int], None]] = None

    def __post_init__(self) -> None:
        if self.per not in (PER_ATOM, PER_STRUCTURE):
            raise ValueError(f"Input.per must be {PER_ATOM!r} or {PER_STRUCTURE!r}, got {self.per!r}")
        if self.dtype not in ("float", "int64"):
            raise ValueError(f"Input.dtype must be 'float' or 'int64', got {self.dtype!r}")


def declared_inputs(blocks: Iterable) -> List[Input]:
    """The inputs several blocks declare, each key once (the first declaration wins)."""
    seen: Dict[str, Input] = {}
    for block in blocks:
        for item in getattr(block, "inputs", ()):
            seen.setdefault(item.key, item)
    return list(seen.values())


#: Outputs every block may return (a block may redeclare them).
STANDARD_OUTPUTS: Tuple[Output, ...] = (Output.charges(),)


def declared_outputs(block) -> Dict[str, Output]:
    """``{result key: Output}`` of a block (class or instance): the standard outputs
    overridden by the block's own declarations.
    """
    outputs = {o.key: o for o in STANDARD_OUTPUTS}
    outputs.update({o.key: o for o in getattr(block, "outputs", ())})
    return outputs


def outputs_by_name(blocks: Iterable) -> Dict[str, Output]:
    """``{output name: Output}`` over several blocks (the first declaration of a name wins)."""
    result: Dict[str, Output] = {}
    for block in blocks:
        for output in declared_outputs(block).values():
            result.setdefault(output.name, output)
    return result


def declared_targets(classes: Optional[Dict[str, type]] = None) -> Dict[str, Tuple[Output, Tuple[str, ...]]]:
    """``{output name: (Output, names of the blocks declaring it as a target)}``.

    Args:
        classes: ``{block name: class}``; default every available block (a block that
            cannot be loaded is skipped here: asking for it by name reports why).
    """
    if classes is None:
        from .registry import available_blocks, get_block

        classes = {}
        for name in available_blocks():
            try:
                classes[name] = get_block(name)
            except Exception:  # a broken third-party plugin must not stop the CLI
                continue
    found: Dict[str, Tuple[Output, Tuple[str, ...]]] = {}
    for name, cls in classes.items():
        for output in declared_outputs(cls).values():
            if output.target is None:
                continue
            first, providers = found.get(output.name, (output, ()))
            found[output.name] = (first, providers + (name,))
    return found
