"""The small model and reference structures of :mod:`mace_lr.testing` (private module)."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import mace  # noqa: F401
import numpy as np
import torch


def make_test_model(
    atomic_numbers: Sequence[int] = (11, 17),
    r_max: float = 4.0,
    hidden_irreps: str = "8x0e+8x1o",
    num_interactions: int = 2,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    heads: Optional[List[str]] = None,
) -> torch.nn.Module:
    """A small randomly initialised ``ScaleShiftMACE`` for tests."""
    from e3nn import o3
    from mace.modules import RealAgnosticResidualInteractionBlock, ScaleShiftMACE

    # e3nn computes its coupling coefficients in the default dtype when the model is built;
    # building in float32 and casting would leave float32-accurate constants in a float64
    # model (equivariance then holds to 1e-7 only). mace offers no dtype argument, so the
    # default is switched for the construction alone and restored at once.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(seed)
        n = len(atomic_numbers)
        kwargs: Dict[str, Any] = {}
        if heads is not None:
            kwargs["heads"] = heads
        model = ScaleShiftMACE(
            r_max=r_max,
            num_bessel=8,
            num_polynomial_cutoff=5,
            max_ell=2,
            interaction_cls=RealAgnosticResidualInteractionBlock,
            interaction_cls_first=RealAgnosticResidualInteractionBlock,
            num_interactions=num_interactions,
            num_elements=n,
            hidden_irreps=o3.Irreps(hidden_irreps),
            MLP_irreps=o3.Irreps("16x0e"),
            atomic_energies=np.linspace(-1.0, -2.0, n)
            if heads is None
            else np.tile(np.linspace(-1.0, -2.0, n), (len(heads), 1)),
            avg_num_neighbors=8.0,
            atomic_numbers=list(atomic_numbers),
            correlation=2,
            gate=torch.nn.functional.silu,
            atomic_inter_scale=1.0 if heads is None else [1.0] * len(heads),
            atomic_inter_shift=0.0 if heads is None else [0.0] * len(heads),
            **kwargs,
        )
    finally:
        torch.set_default_dtype(previous)
    return model.to(dtype)


def reference_systems(seed: int = 0) -> Dict[str, Any]:
    """Small rattled NaCl-like structures: ``periodic``, ``triclinic``, ``open``, ``slab``."""
    from ase import Atoms
    from ase.build import bulk

    rng = np.random.default_rng(seed)
    out: Dict[str, Any] = {}
    periodic = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
    periodic.positions += rng.normal(scale=0.15, size=periodic.positions.shape)
    out["periodic"] = periodic
    tric = bulk("NaCl", "rocksalt", a=5.64) * (2, 1, 1)
    tric.positions += rng.normal(scale=0.15, size=tric.positions.shape)
    out["triclinic"] = tric
    grid = np.array([[i, j, k] for i in range(2) for j in range(2) for k in range(2)], float) * 2.82
    numbers = [11 if (i + j + k) % 2 == 0 else 17 for i, j, k in (grid / 2.82).astype(int)]
    cluster = Atoms(numbers=numbers, positions=grid + rng.normal(scale=0.15, size=grid.shape))
    out["open"] = cluster
    slab = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
    slab.cell[2] = [0.0, 0.0, 18.0]
    slab.pbc = [True, True, False]
    slab.positions += rng.normal(scale=0.15, size=slab.positions.shape)
    out["slab"] = slab
    return out
