"""The models and reference structures of :mod:`mace_lr.testing` (private module): a small
random MACE, random MACEs with foundation-model architectures, rattled NaCl structures.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import mace  # noqa: F401
import numpy as np
import torch

from ._mace_adapter import building_in


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

    with building_in(dtype):
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


#: Published architectures of MACE foundation models (hidden irreps, cutoff, elements...).
#: MACE-MP-0 (Batatia et al. 2023, the ``mace_mp`` small/medium models): 89 elements
#: (Z = 1-89), r_max 6 Å, 10 Bessel functions, max_ell 3, correlation 3, 2 interactions,
#: radial MLP [64, 64, 64], MLP irreps 16x0e. MACE-OFF23 (Kovács et al. 2023): 10 elements
#: H C N O F P S Cl Br I, max_ell 3, correlation 3, 2 interactions; small: 96x0e with a
#: 4.5 Å cutoff, medium 128x0e+128x1o at 5 Å.
_OFF_ELEMENTS = [1, 6, 7, 8, 9, 15, 16, 17, 35, 53]
FOUNDATION_ARCHITECTURES: Dict[str, Dict[str, Any]] = {
    "mp0-small": {"hidden_irreps": "128x0e", "r_max": 6.0, "atomic_numbers": list(range(1, 90))},
    "mp0-medium": {"hidden_irreps": "128x0e+128x1o", "r_max": 6.0, "atomic_numbers": list(range(1, 90))},
    "off23-small": {"hidden_irreps": "96x0e", "r_max": 4.5, "atomic_numbers": _OFF_ELEMENTS},
    "off23-medium": {
        "hidden_irreps": "128x0e+128x1o",
        "r_max": 5.0,
        "atomic_numbers": _OFF_ELEMENTS,
    },
}


def make_foundation_like_model(
    name: str = "mp0-small",
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    avg_num_neighbors: float = 20.0,
) -> torch.nn.Module:
    """A ``ScaleShiftMACE`` with a foundation model's published architecture, random weights.

    The released weights cannot be downloaded here; for timing, memory and the identity
    and contract checks only the architecture matters. ``name`` is one of
    :data:`FOUNDATION_ARCHITECTURES`.
    """
    from e3nn import o3
    from mace.modules import (
        RealAgnosticInteractionBlock,
        RealAgnosticResidualInteractionBlock,
        ScaleShiftMACE,
    )

    if name not in FOUNDATION_ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; choose from {', '.join(FOUNDATION_ARCHITECTURES)}")
    arch = FOUNDATION_ARCHITECTURES[name]
    numbers = arch["atomic_numbers"]
    with building_in(dtype):
        torch.manual_seed(seed)
        model = ScaleShiftMACE(
            r_max=arch["r_max"],
            num_bessel=10 if name.startswith("mp0") else 8,
            num_polynomial_cutoff=5,
            max_ell=3,
            interaction_cls=RealAgnosticResidualInteractionBlock,
            interaction_cls_first=RealAgnosticInteractionBlock,
            num_interactions=2,
            num_elements=len(numbers),
            hidden_irreps=o3.Irreps(arch["hidden_irreps"]),
            MLP_irreps=o3.Irreps("16x0e"),
            atomic_energies=-np.linspace(1.0, 5.0, len(numbers)),
            avg_num_neighbors=avg_num_neighbors,
            atomic_numbers=list(numbers),
            correlation=3,
            gate=torch.nn.functional.silu,
            radial_MLP=[64, 64, 64],
            atomic_inter_scale=1.0,
            atomic_inter_shift=0.0,
        )
    return model.to(dtype)
