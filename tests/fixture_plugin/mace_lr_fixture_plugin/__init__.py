"""Test-only plugin distribution registering blocks for the ``mace_lr`` registry tests."""

from __future__ import annotations

from typing import Dict

import torch

from mace_lr import LongRangeBlock

__all__ = ["ConstantBlock", "NotABlock"]


class ConstantBlock(LongRangeBlock):
    """Block adding zero energy: ``scale`` (initialised to 0) times zeros per graph."""

    name = "fixture_constant"

    def __init__(self, feature_irreps: str = "0e", atomic_numbers=(1,), r_max: float = 5.0, **config) -> None:
        super().__init__(feature_irreps, atomic_numbers, r_max, **config)
        self.scale = torch.nn.Parameter(torch.zeros(()))

    def forward(self, ctx: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Return zero energy per graph.

        Args:
            ctx: context dictionary; uses ``ptr`` and ``positions``.

        Returns:
            ``{"energy": [n_graphs] zeros}`` in the dtype/device of ``positions``.
        """
        positions = ctx["positions"]
        n_graphs = ctx["ptr"].numel() - 1
        zeros = torch.zeros(n_graphs, dtype=positions.dtype, device=positions.device)
        return {"energy": zeros * self.scale.to(positions.dtype)}


class NotABlock:
    """A plain class registered as a block on purpose (the registry must reject it)."""

    name = "fixture_not_a_block"
