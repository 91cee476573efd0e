r"""Charge equilibration of a batch of small open molecules in one dense solve (private).

Each graph's QEq problem (see :mod:`._qeq`) is the saddle-point system

.. math:: \begin{pmatrix} A_g & \mathbf 1 \\ \mathbf 1^\top & 0 \end{pmatrix}
          \begin{pmatrix} q_g \\ \lambda_g \end{pmatrix} =
          \begin{pmatrix} -\chi_g \\ Q_g \end{pmatrix},

one Lagrange multiplier per graph. The graphs are padded to the largest one (padding
slots get an identity row and a zero right-hand side, so their charges are 0) and solved
with one batched :func:`torch.linalg.solve` in float64; derivatives of every order come
from autograd through the solve. The matrix is the one the per-structure solver
assembles: the exact open-boundary sum of Gaussians of width ``s0`` plus the width
correction ``k_e[erf(r/√2γ_ij) − erf(r/√2 s0)]/r`` within the same pair cutoff.
"""

from __future__ import annotations

import math
from typing import Dict, Optional

import torch

from ._kernels import COINCIDENT_R2, COULOMB_CONSTANT
from ._qeq_operator import _erfcinv

_SQRT2 = math.sqrt(2.0)
_SQRTPI = math.sqrt(math.pi)


def solve_qeq_open_batch(
    positions: torch.Tensor,
    electronegativity: torch.Tensor,
    hardness: torch.Tensor,
    widths: torch.Tensor,
    ptr: torch.Tensor,
    total_charge: torch.Tensor,
    accuracy: float = 1e-6,
    base_smearing: float = 0.0,
    n_max: Optional[int] = None,
) -> Dict[str, torch.Tensor]:
    r"""QEq charges and energies of a batch of open-boundary structures in one dense solve.

    Args:
        positions: [N, 3] Å, graph after graph.
        electronegativity: [N] χ_i, V.
        hardness: [N] J_i > 0, eV/e².
        widths: [N] Gaussian standard deviations σ_i > 0, Å.
        ptr: [G + 1] int64 atom offsets.
        total_charge: [G] e.
        accuracy: sets the cutoff of the width correction, as in :func:`solve_qeq`.
        base_smearing: common width ``s0`` of the engine part, Å (0: point charges).
        n_max: the largest graph (computed from ``ptr`` when omitted).

    Returns:
        ``charges`` [N] e, ``energy`` [G] eV and ``chemical_potential`` [G] V, in the dtype
        of ``positions``; differentiable in every input.
    """
    n_atoms = positions.shape[0]
    for name, x in (("electronegativity", electronegativity), ("hardness", hardness), ("widths", widths)):
        if x.shape != (n_atoms,):
            raise ValueError(f"`{name}` must have shape [{n_atoms}], got {tuple(x.shape)}")
    n_graphs = ptr.shape[0] - 1
    if total_charge.shape != (n_graphs,):
        raise ValueError(f"`total_charge` must have shape [{n_graphs}], got {tuple(total_charge.shape)}")
    if bool((hardness.detach() <= 0).any()):
        raise ValueError("hardness J must be > 0 eV/e² for every atom")
    if bool((widths.detach() <= 0).any()):
        raise ValueError("Gaussian widths must be > 0 Å")
    dtype, device = positions.dtype, positions.device
    f64 = torch.float64
    counts = ptr[1:] - ptr[:-1]
    if n_max is None:
        n_max = int(counts.max()) if n_graphs else 0
    graph = torch.repeat_interleave(torch.arange(n_graphs, device=device), counts)
    local = torch.arange(n_atoms, device=device) - ptr[:-1][graph]
    idx = (graph, local)

    def pad(x: torch.Tensor, fill: float) -> torch.Tensor:
        out = torch.full((n_graphs, n_max) + tuple(x.shape[1:]), fill, dtype=f64, device=device)
        return out.index_put(idx, x.to(f64))

    pos = pad(positions, 0.0)
    sigma = pad(widths, 1.0)
    chi = pad(electronegativity, 0.0)
    slots = torch.arange(n_max, device=device)
    real = slots[None, :] < counts[:, None]
    eye = (slots[:, None] == slots[None, :])[None]
    valid = real[:, :, None] & real[:, None, :] & ~eye
    diff = pos[:, :, None, :] - pos[:, None, :, :]
    r2 = torch.clamp((diff * diff).sum(-1), min=COINCIDENT_R2)
    r = torch.sqrt(torch.where(valid, r2, torch.ones_like(r2)))
    gamma = torch.sqrt(sigma[:, :, None] ** 2 + sigma[:, None, :] ** 2)
    s0 = float(base_smearing)
    base = torch.erf(r / (_SQRT2 * s0)) / r if s0 > 0.0 else 1.0 / r
    # the per-structure pair cutoff: from the widest kernel of each graph
    widest = torch.clamp(_SQRT2 * torch.where(real, sigma, torch.zeros_like(sigma)).amax(1), min=s0)
    cutoff = (_SQRT2 * _erfcinv(float(accuracy))) * widest.detach()
    full = torch.where(r < cutoff[:, None, None], torch.erf(r / (_SQRT2 * gamma)) / r, base)
    coulomb = COULOMB_CONSTANT * torch.where(valid, full, torch.zeros_like(full))
    diagonal = pad(hardness, 1.0) + torch.where(
        real, COULOMB_CONSTANT / (_SQRTPI * sigma), torch.zeros_like(sigma)
    )
    a = coulomb + torch.diag_embed(diagonal)
    ones = real.to(f64)
    top = torch.cat([a, ones[:, :, None]], dim=2)
    bottom = torch.cat([ones, torch.zeros((n_graphs, 1), dtype=f64, device=device)], dim=1)[:, None, :]
    system = torch.cat([top, bottom], dim=1)  # [G, n+1, n+1]
    rhs = torch.cat([-chi, total_charge.to(f64)[:, None]], dim=1)
    solution = torch.linalg.solve(system, rhs)  # [G, n+1]
    q_pad = solution[:, :n_max]
    energy = (chi * q_pad).sum(1) + 0.5 * (q_pad * (a @ q_pad[:, :, None])[:, :, 0]).sum(1)
    return {
        "charges": q_pad[idx].to(dtype),
        "energy": energy.to(dtype),
        "chemical_potential": (-solution[:, n_max]).to(dtype),
    }
