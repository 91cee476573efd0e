"""Electrostatic potential of point or Gaussian charges for one structure (private).

Three boundary conditions, chosen from ``pbc``:

* ``[T, T, T]`` — Ewald (small cells) or P3M through torch-pme (large cells), with a
  neutralising background for net-charged cells;
* ``[F, F, F]`` — exact open-boundary pair sum, chunked so memory stays linear in N;
* ``[T, T, F]`` — 2D-periodic slab: 3D Ewald/P3M in a cell extended along z by a vacuum
  chosen from the requested accuracy, plus the Yeh–Berkowitz dipole correction with the
  Ballenegger–Arnold–Cerdà terms for net charge.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from .._geometry import cell_volume
from ._kernels import (
    COINCIDENT_R2,
    COULOMB_CONSTANT,
    EwaldParameters,
    choose_parameters,
    ewald_reciprocal_potential,
    pair_kernel,
    safe_distance,
    truncated_short_range_kernel,
)

logger = logging.getLogger(__name__)

_PARAMETER_CACHE: "OrderedDict[tuple, EwaldParameters]" = OrderedDict()
_P3M_CACHE: "OrderedDict[tuple, torch.nn.Module]" = OrderedDict()
_CACHE_SIZE = 64
_NET_CHARGE_NOTED = {"done": False}


def validate_inputs(
    positions: torch.Tensor,
    charges: torch.Tensor,
    cell: Optional[torch.Tensor],
    pbc,
) -> Tuple[torch.Tensor, torch.Tensor, Tuple[bool, bool, bool]]:
    """Check shapes and types; return ``cell`` as [3, 3] tensor and ``pbc`` as a tuple."""
    if not isinstance(positions, torch.Tensor) or positions.ndim != 2 or positions.shape[1] != 3:
        shape = tuple(positions.shape) if isinstance(positions, torch.Tensor) else type(positions)
        raise ValueError(f"`positions` must be a tensor with shape [n_atoms, 3], got {shape}")
    n_atoms = positions.shape[0]
    if not isinstance(charges, torch.Tensor) or charges.ndim not in (1, 2) or charges.shape[0] != n_atoms:
        shape = tuple(charges.shape) if isinstance(charges, torch.Tensor) else type(charges)
        raise ValueError(
            f"`charges` must be a tensor with shape [n_atoms] or [n_atoms, n_channels] "
            f"with n_atoms={n_atoms}, got {shape}"
        )
    if charges.dtype != positions.dtype:
        raise ValueError(f"`charges` dtype {charges.dtype} differs from `positions` dtype {positions.dtype}")
    pbc_t = tuple(
        bool(p)
        for p in (torch.as_tensor(pbc).reshape(-1).tolist() if not isinstance(pbc, bool) else [pbc] * 3)
    )
    if len(pbc_t) != 3:
        raise ValueError(f"`pbc` must have 3 entries, got {len(pbc_t)}")
    if pbc_t not in ((True, True, True), (False, False, False), (True, True, False)):
        raise ValueError(
            f"`pbc` must be [True, True, True], [False, False, False] or [True, True, False] "
            f"(slab, vacuum along the third lattice vector), got {list(pbc_t)}"
        )
    if cell is None:
        cell = torch.zeros(3, 3, dtype=positions.dtype, device=positions.device)
    if not isinstance(cell, torch.Tensor) or tuple(cell.shape) != (3, 3):
        shape = tuple(cell.shape) if isinstance(cell, torch.Tensor) else type(cell)
        raise ValueError(f"`cell` must be a tensor with shape [3, 3], got {shape}")
    if any(pbc_t):
        cell_d = cell.detach()
        if pbc_t[2]:
            measure = float(torch.linalg.det(cell_d).abs())
        else:
            measure = float(torch.linalg.norm(torch.linalg.cross(cell_d[0], cell_d[1])))
        if measure < 1e-6:
            raise ValueError(
                f"periodic boundary conditions pbc={list(pbc_t)} need a cell with non-zero "
                f"volume (slab: non-zero area), got cell={cell.detach().cpu().tolist()}"
            )
    return cell, charges, pbc_t


def _cached_parameters(
    cell: torch.Tensor, n_atoms: int, smearing: float, accuracy: float, method: str
) -> EwaldParameters:
    cell_np = cell.detach().cpu().double().numpy()
    # Parameters depend on the cell only through its size: key on a 0.05 Å grid
    key = (tuple(np.round(cell_np.reshape(-1) / 0.05).astype(int)), n_atoms, smearing, accuracy, method)
    params = _PARAMETER_CACHE.get(key)
    if params is None:
        params = choose_parameters(cell_np, n_atoms, smearing, accuracy, method)
        _PARAMETER_CACHE[key] = params
        logger.debug("electrostatics parameters for N=%d: %s", n_atoms, params)
        if len(_PARAMETER_CACHE) > _CACHE_SIZE:
            _PARAMETER_CACHE.popitem(last=False)
    else:
        _PARAMETER_CACHE.move_to_end(key)
    return params


def _neighbor_pairs(
    positions: torch.Tensor, cell: torch.Tensor, rcut: float, periodic: Tuple[bool, bool, bool]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Half neighbour list within ``rcut``: pair indices [M, 2] and distances [M] (in torch)."""
    from vesin import NeighborList

    pos_np = positions.detach().cpu().double().numpy()
    cell_np = cell.detach().cpu().double().numpy()
    i, j, shifts = NeighborList(cutoff=rcut, full_list=False).compute(
        points=pos_np, box=cell_np, periodic=list(periodic), quantities="ijS"
    )
    device = positions.device
    i_t = torch.as_tensor(i.astype(np.int64), device=device)
    j_t = torch.as_tensor(j.astype(np.int64), device=device)
    s_t = torch.as_tensor(shifts, dtype=positions.dtype, device=device)
    vec = positions[j_t] - positions[i_t] + s_t @ cell
    return torch.stack([i_t, j_t], dim=1), safe_distance(vec)


def _real_space(
    positions: torch.Tensor,
    charges: torch.Tensor,
    cell: torch.Tensor,
    params: EwaldParameters,
    smearing: float,
    periodic: Tuple[bool, bool, bool],
) -> torch.Tensor:
    if params.rcut <= 0.0:
        return torch.zeros_like(charges)
    pairs, dist = _neighbor_pairs(positions, cell, params.rcut, periodic)
    v = truncated_short_range_kernel(dist, smearing, params.split, params.rcut)[:, None]
    i, j = pairs[:, 0], pairs[:, 1]
    phi = torch.zeros_like(charges)
    phi = phi.index_add(0, i, v * charges[j])
    phi = phi.index_add(0, j, v * charges[i])
    return phi


def _p3m_calculator(params: EwaldParameters, dtype: torch.dtype, device: torch.device):
    key = (params.split, params.mesh_spacing, params.interpolation_nodes, dtype, str(device))
    calc = _P3M_CACHE.get(key)
    if calc is None:
        from ._mesh import MeshKSpace

        calc = MeshKSpace(params.split, params.mesh_spacing, params.interpolation_nodes).to(
            device=device, dtype=dtype
        )
        _P3M_CACHE[key] = calc
        if len(_P3M_CACHE) > 8:
            _P3M_CACHE.popitem(last=False)
    else:
        _P3M_CACHE.move_to_end(key)
    return calc


def _reciprocal_space(
    positions: torch.Tensor,
    charges: torch.Tensor,
    cell: torch.Tensor,
    params: EwaldParameters,
    smearing: float,
) -> torch.Tensor:
    """k-space potential with self term and neutralising background removed."""
    volume = cell_volume(cell)
    q_tot = charges.sum(0, keepdim=True)
    if params.method == "ewald":
        phi = ewald_reciprocal_potential(positions, charges, cell, params.split, params.kcut)
        phi = phi - charges * (2.0 / (math.sqrt(2.0 * math.pi) * params.split))
        phi = phi - q_tot * (2.0 * math.pi * params.split**2) / volume
    else:
        calc = _p3m_calculator(params, positions.dtype, positions.device)
        empty_i = torch.zeros((0, 2), dtype=torch.int64, device=positions.device)
        empty_d = torch.zeros((0,), dtype=positions.dtype, device=positions.device)
        # torch-pme returns half the potential; its k-space part includes self and
        # background terms for the split width
        phi = 2.0 * calc(charges, cell, positions, empty_i, empty_d)
    # the real-space kernel for Gaussian charges integrates to -2πσ² less than for points:
    # the background term of the smeared charges is π(s² - σ²)Q²/V, not πs²Q²/V.
    if smearing > 0.0:
        phi = phi + q_tot * (2.0 * math.pi * smearing**2) / volume
    return phi


def _note_net_charge(charges: torch.Tensor) -> None:
    q_tot = charges.detach().sum(0).abs().max()
    if float(q_tot) > 1e-6 and not _NET_CHARGE_NOTED["done"]:
        _NET_CHARGE_NOTED["done"] = True
        logger.info(
            "periodic cell with net charge %.3g e: a uniform neutralising background is "
            "added (noted once per process)",
            float(q_tot),
        )


def _periodic_potential(positions, charges, cell, smearing, accuracy, method):
    params = _cached_parameters(cell, positions.shape[0], smearing, accuracy, method)
    _note_net_charge(charges)
    phi = _real_space(positions, charges, cell, params, smearing, (True, True, True))
    return phi + _reciprocal_space(positions, charges, cell, params, smearing)


def _open_potential(positions: torch.Tensor, charges: torch.Tensor, smearing: float, chunk_size: int = 1024):
    """Exact open-boundary potential, rows in chunks so memory is O(chunk × N)."""
    n = positions.shape[0]
    out = []
    for start in range(0, n, chunk_size):
        stop = min(n, start + chunk_size)
        diff = positions[start:stop, None, :] - positions[None, :, :]
        idx = torch.arange(start, stop, device=positions.device)
        # exclude i == j without creating NaNs in the backward pass
        self_mask = torch.zeros(stop - start, n, dtype=torch.bool, device=positions.device)
        self_mask[torch.arange(stop - start, device=positions.device), idx] = True
        r2 = torch.clamp((diff * diff).sum(-1), min=COINCIDENT_R2)  # coincident Gaussian sites
        r = torch.sqrt(torch.where(self_mask, torch.ones_like(r2), r2))
        v = torch.where(self_mask, torch.zeros_like(r), pair_kernel(r, smearing))
        out.append(v @ charges)
    return torch.cat(out, dim=0) if out else torch.zeros_like(charges)


def _slab_frame(positions: torch.Tensor, cell: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rotate so the periodic vectors a, b lie in the xy-plane (differentiable in the cell).

    A strained slab (e.g. under xz shear) tilts its plane; the energy is rotation
    invariant, so it is evaluated in the slab's own frame.
    """
    a, b = cell[0], cell[1]
    e1 = a / torch.linalg.norm(a)
    normal = torch.linalg.cross(a, b)
    e3 = normal / torch.linalg.norm(normal)
    e2 = torch.linalg.cross(e3, e1)
    rot = torch.stack([e1, e2, e3])  # rows: new axes
    return positions @ rot.T, cell[:2] @ rot.T


def _slab_height(
    positions: torch.Tensor, in_plane: torch.Tensor, accuracy: float, cell_height: float = 0.0
) -> float:
    """Height of the extended cell: the slab region plus a vacuum set by the accuracy.

    The slab region is the user's cell height along the normal (or the atoms' extent if
    larger), so the height does not follow the atoms along an MD run: a neutral slab's
    energy does not depend on it, but a net-charged slab's energy does (its neutralising
    background fills the extended cell), and a height that followed the atoms would make
    the energy jump.
    """
    z = positions.detach()[:, 2]
    thickness = float(z.max() - z.min()) if z.numel() else 0.0
    region = max(float(cell_height), thickness)
    longest = float(torch.linalg.norm(in_plane.detach(), dim=1).max())
    # residual interaction between replicas decays as exp(-2π gap / L_xy)
    gap = max(2.0 * region, longest * (math.log(1.0 / accuracy) + 2.0) / (2.0 * math.pi), 10.0)
    return 5.0 * math.ceil((region + gap) / 5.0)  # quantised so parameters stay cached


def _slab_potential(positions, charges, cell, smearing, accuracy, method):
    positions, in_plane = _slab_frame(positions, cell)
    normal = torch.linalg.cross(cell[0], cell[1]).detach()
    cell_height = float(torch.abs(cell[2].detach() @ normal) / torch.linalg.norm(normal))
    lz = _slab_height(positions, in_plane, accuracy, cell_height)
    # centre the slab in the extended cell with a smooth, differentiable shift so the
    # energy depends on relative heights only (exact translation invariance along z)
    z_shift = positions[:, 2].mean() - 0.5 * lz
    pos = positions - torch.stack([torch.zeros_like(z_shift), torch.zeros_like(z_shift), z_shift])
    ext = torch.cat([in_plane, torch.tensor([[0.0, 0.0, lz]], dtype=cell.dtype, device=cell.device)], 0)
    phi = _periodic_potential(pos, charges, ext, smearing, accuracy, method)
    # Yeh–Berkowitz correction with Ballenegger–Arnold–Cerdà net-charge terms:
    # E_c = 2π/V [M_z² - Q Σ q z² - Q² L_z²/12]
    volume = cell_volume(ext)
    z = pos[:, 2:3]
    q_tot = charges.sum(0, keepdim=True)
    m_z = (charges * z).sum(0, keepdim=True)
    m_zz = (charges * z * z).sum(0, keepdim=True)
    corr = (2.0 * math.pi / volume) * (2.0 * m_z * z - m_zz - q_tot * z * z - q_tot * lz * lz / 6.0)
    return phi + corr


def coulomb_potential_single(
    positions: torch.Tensor,
    charges: torch.Tensor,
    cell: Optional[torch.Tensor],
    pbc,
    smearing: Optional[float] = None,
    accuracy: float = 1e-6,
    method: str = "auto",
) -> torch.Tensor:
    """Electrostatic potential (V) at every atom of one structure; see the public docs."""
    cell, charges, pbc_t = validate_inputs(positions, charges, cell, pbc)
    squeeze = charges.ndim == 1
    q = charges[:, None] if squeeze else charges
    sigma = float(smearing) if smearing is not None else 0.0
    if sigma < 0:
        raise ValueError(f"`smearing` must be >= 0 Å or None, got {smearing}")
    if not (0.0 < accuracy < 1.0):
        raise ValueError(f"`accuracy` must be in (0, 1), got {accuracy}")
    if positions.shape[0] == 0:
        phi = torch.zeros_like(q)
    elif pbc_t == (False, False, False):
        phi = _open_potential(positions, q, sigma)
    elif pbc_t == (True, True, True):
        phi = _periodic_potential(positions, q, cell, sigma, accuracy, method)
    else:
        phi = _slab_potential(positions, q, cell, sigma, accuracy, method)
    phi = phi * COULOMB_CONSTANT
    return phi[:, 0] if squeeze else phi


def cache_info() -> Dict[str, int]:
    """Sizes of the parameter and calculator caches (for diagnostics and tests)."""
    return {"parameters": len(_PARAMETER_CACHE), "p3m_calculators": len(_P3M_CACHE)}
