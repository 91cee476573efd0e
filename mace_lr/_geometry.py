"""Cell geometry shared by the wrapper, the response maths and the electrostatics engine."""

from __future__ import annotations

import torch


def cell_volume(cell: torch.Tensor) -> torch.Tensor:
    """|a · (b × c)| of cells [..., 3, 3] (rows are lattice vectors), Å³.

    Written as a triple product rather than ``torch.linalg.det``: on torch 2.13 the
    backward of ``det`` fails for float32 cells when the default dtype is float64 (as mace
    sets it), and stress and strain derivatives need this gradient.
    """
    return torch.abs((cell[..., 0, :] * torch.linalg.cross(cell[..., 1, :], cell[..., 2, :])).sum(-1))
