"""The block contract: what every long-range block implements.

A block is a :class:`torch.nn.Module` subclass of :class:`LongRangeBlock`. It receives a
context dictionary ``ctx`` of tensors (listed in :data:`CONTEXT_KEYS`, plus the inputs the
blocks declare in :attr:`LongRangeBlock.inputs`) and returns a
dictionary holding at least ``"energy"`` (one value per graph, eV).
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar, Dict, List, Sequence, Tuple

import torch

from ._outputs import Input, Output

#: Keys of the context dictionary handed to :meth:`LongRangeBlock.forward`.
CONTEXT_KEYS: Dict[str, str] = {
    "positions": "[n_atoms, 3] Å, already strained (derivatives give forces and stress)",
    "cell": "[n_graphs, 3, 3] Å, rows are lattice vectors, strained with the positions",
    "pbc": "[n_graphs, 3] bool, periodic directions",
    "batch": "[n_atoms] int64, graph index of each atom",
    "ptr": "[n_graphs + 1] int64, atom offsets of each graph",
    "atomic_numbers": "[n_atoms] int64",
    "node_attrs": "[n_atoms, n_elements] one-hot element encoding of the base model",
    "node_feats": "[n_atoms, F] base-model features (irreps given to the constructor)",
    "total_charge": "[n_graphs] e",
    "external_field": "[n_graphs, 3] V/Å (zeros when no field is applied)",
    "edge_index": "[2, n_edges] int64, the base model's graph",
    "shifts": "[n_edges, 3] Å, periodic image shifts of the edges (strained)",
}


def straight_through_coupling(a: torch.Tensor) -> torch.Tensor:
    """Coupling ``γ = max(a, 0)`` whose gradient is that of ``a`` everywhere.

    Blocks that start silent (``a = 0``) and must be able to switch on take their energy
    scale from this: γ is never negative, and ``a`` still gets the gradient that asks for
    more (or less) of the block when γ is clamped at 0.
    """
    return a + (torch.clamp(a, min=0.0) - a).detach()


class LongRangeBlock(torch.nn.Module):
    """Base class of every long-range block.

    Subclasses set :attr:`name`, accept the keyword arguments below plus their own
    configuration, and implement :meth:`forward`.

    Args:
        feature_irreps: irreps string of the base model's ``node_feats`` output.
        atomic_numbers: elements the base model knows, in its one-hot order.
        r_max: cutoff radius of the base model, Å.
        **config: the block's own hyper-parameters (JSON-serialisable values).
    """

    #: Registry name of the block (e.g. ``"les"``).
    name: ClassVar[str] = ""
    #: Context keys the block needs the data to provide explicitly (e.g. ``total_charge``).
    required_inputs: ClassVar[Sequence[str]] = ()
    #: Inputs the block reads but can do without: when no training structure has one of
    #: them, ``mace_lr_run_train`` warns that the block cannot learn from it.
    optional_inputs: ClassVar[Sequence[str]] = ()
    #: Inputs beyond :data:`CONTEXT_KEYS` the block reads from the data (see
    #: :class:`mace_lr.Input`), e.g. electrode labels; in ``ctx`` under their keys.
    inputs: ClassVar[Tuple[Input, ...]] = ()
    #: What the block returns besides ``energy`` (see :class:`mace_lr.Output`): per atom or
    #: per structure, unit, the name the model and the calculator report, and an optional
    #: training target. ``charges`` is declared for every block (:data:`STANDARD_OUTPUTS`);
    #: results not declared are reported as ``<block>_<key>`` only.
    outputs: ClassVar[Tuple[Output, ...]] = ()

    def __init__(
        self,
        feature_irreps: str,
        atomic_numbers: Sequence[int],
        r_max: float,
        **config: Any,
    ) -> None:
        super().__init__()
        self.feature_irreps = str(feature_irreps)
        self.atomic_numbers: List[int] = [int(z) for z in atomic_numbers]
        self.r_max = float(r_max)
        self._config: Dict[str, Any] = copy.deepcopy(dict(config))

    @classmethod
    def required_inputs_for(cls, options: Dict[str, Any]) -> Sequence[str]:
        """Context keys a block built with ``options`` requires from the data.

        :attr:`required_inputs` by default; a block whose needs depend on its options
        (e.g. LES with ``total_charge``) overrides this, so that training checks the data
        before it starts.
        """
        return tuple(cls.required_inputs)

    def forward(self, ctx: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Compute the block's contribution.

        Args:
            ctx: context dictionary (:data:`CONTEXT_KEYS`): ``positions`` [N, 3] Å and
                ``cell`` [G, 3, 3] Å (both strained), ``pbc`` [G, 3], ``batch`` [N], ``ptr``
                [G + 1], ``atomic_numbers`` [N], ``node_attrs`` [N, n_elements],
                ``node_feats`` [N, F], ``total_charge`` [G] e, ``external_field`` [G, 3] V/Å,
                ``edge_index`` [2, E], ``shifts`` [E, 3] Å, plus the declared :attr:`inputs`.

        Returns:
            ``{"energy": [n_graphs] eV, ...}``; optional ``"charges"`` [n_atoms] e and
            ``"atomic_dipoles"`` [n_atoms, 3] e·Å, plus named extras.
        """
        raise NotImplementedError

    def to_config(self) -> Dict[str, Any]:
        """Constructor arguments that rebuild this block (weights excluded)."""
        return {
            "feature_irreps": self.feature_irreps,
            "atomic_numbers": list(self.atomic_numbers),
            "r_max": self.r_max,
            **copy.deepcopy(self._config),
        }

    @classmethod
    def from_config(cls, config: Dict[str, Any]) -> "LongRangeBlock":
        """Build a block from :meth:`to_config` output."""
        return cls(**copy.deepcopy(dict(config)))

    def extra_repr(self) -> str:
        return f"name={self.name!r}, config={self._config!r}"
