r"""Pair kernels, parameter choice and the pieces of the Ewald sum (private).

Conventions: Gaussian charges of width ``σ`` interact through

.. math:: v(r) = \operatorname{erf}\!\left(\frac{r}{\sqrt{2}\,\sigma}\right) / r,

(``σ = 0``: point charges, ``v = 1/r``). The Ewald split uses a second width ``s ≥ σ``:
``v_lr(r) = erf(r/(√2 s))/r`` with Fourier transform ``4π exp(-s²k²/2)/k²`` (the same
convention as torch-pme's ``smearing``), and ``v_sr = v - v_lr``.

All functions here work in units where the Coulomb constant is 1; the public layer
multiplies by :data:`COULOMB_CONSTANT`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch

from .._geometry import cell_volume

#: Coulomb constant in eV·Å/e².
COULOMB_CONSTANT = 14.399645

_SQRT2 = math.sqrt(2.0)


#: Squared distance (Å²) below which two sites count as coincident. Gaussian charges on top
#: of each other (a Wannier centroid on its ion, a core and its shell) have a finite,
#: smooth pair energy; their distance is clamped here so that the gradient of ``|r|``
#: (undefined at 0) never enters the backward pass. The clamp changes ``v`` by a relative
#: ``(r/σ)²/6 < 1e-13`` for any σ ≥ 0.1 Å.
COINCIDENT_R2 = 1e-12


def safe_distance(vec: torch.Tensor) -> torch.Tensor:
    """``|vec|`` over the last axis with a zero gradient for coincident sites (Å)."""
    r2 = (vec * vec).sum(-1)
    return torch.sqrt(torch.clamp(r2, min=COINCIDENT_R2))


def pair_kernel(r: torch.Tensor, smearing: float) -> torch.Tensor:
    """Full pair kernel ``v(r)`` in 1/Å for point (``smearing=0``) or Gaussian charges."""
    if smearing > 0.0:
        return torch.erf(r / (_SQRT2 * smearing)) / r
    return 1.0 / r


def short_range_kernel(r: torch.Tensor, smearing: float, split: float) -> torch.Tensor:
    """Real-space part ``v(r) - erf(r/(√2 s))/r`` of the Ewald split, 1/Å.

    For Gaussian charges this is ``[erf(r/√2σ) - erf(r/√2s)]/r``: written with ``erf``
    below ``r = 2σ`` (at small ``r`` the ``erfc`` difference cancels catastrophically,
    which matters for coincident Gaussian sites in float32) and with ``erfc`` above it
    (where the ``erf`` difference would).
    """
    x_split = r / (_SQRT2 * split)
    if smearing > 0.0:
        x_sigma = r / (_SQRT2 * smearing)
        near = torch.erf(x_sigma) - torch.erf(x_split)
        far = torch.erfc(x_split) - torch.erfc(x_sigma)
        return torch.where(r < 2.0 * smearing, near, far) / r
    return torch.erfc(x_split) / r


def _short_range_value_and_slope(r: float, smearing: float, split: float) -> Tuple[float, float]:
    """``v_sr(r)`` and ``dv_sr/dr`` at one distance (Python floats, 1/Å and 1/Å²)."""
    a_split = _SQRT2 * split
    f = -math.erf(r / a_split)
    df = -2.0 / (math.sqrt(math.pi) * a_split) * math.exp(-((r / a_split) ** 2))
    if smearing > 0.0:
        a_sigma = _SQRT2 * smearing
        f += math.erf(r / a_sigma)
        df += 2.0 / (math.sqrt(math.pi) * a_sigma) * math.exp(-((r / a_sigma) ** 2))
    else:
        f += 1.0
    return f / r, df / r - f / (r * r)


def truncated_short_range_kernel(r: torch.Tensor, smearing: float, split: float, rcut: float) -> torch.Tensor:
    r"""The real-space kernel as summed: shifted-force truncation at ``rcut``, 1/Å.

    .. math:: v_\mathrm{sf}(r) = v_\mathrm{sr}(r) - v_\mathrm{sr}(r_c)
              - (r - r_c)\, v_\mathrm{sr}'(r_c) \quad (r < r_c), \qquad 0 \ \text{beyond},

    so energy and forces stay continuous when a pair crosses the cutoff (plain truncation
    makes the energy jump by :math:`k_e q_i q_j v_\mathrm{sr}(r_c)`, which for the large
    ion and centroid charges of a Wannier model breaks finite-difference forces and
    energy conservation). The correction is of the size of the truncation error that the
    choice of ``rcut`` already accepts.
    """
    value, slope = _short_range_value_and_slope(rcut, smearing, split)
    v = short_range_kernel(r, smearing, split) - value - (r - rcut) * slope
    return torch.where(r < rcut, v, torch.zeros_like(v))


@dataclass(frozen=True)
class EwaldParameters:
    """Parameters of one periodic evaluation.

    Attributes:
        method: ``"ewald"`` or ``"p3m"``.
        split: Ewald splitting width ``s``, Å.
        rcut: real-space cutoff, Å (0 when the real-space part vanishes).
        kcut: reciprocal cutoff, 1/Å (Ewald only).
        mesh_spacing: Å (P3M only).
        interpolation_nodes: P3M assignment order.
    """

    method: str
    split: float
    rcut: float
    kcut: float = 0.0
    mesh_spacing: float = 0.0
    interpolation_nodes: int = 5


def choose_parameters(
    cell: np.ndarray,
    n_atoms: int,
    smearing: float,
    accuracy: float,
    method: str = "auto",
) -> EwaldParameters:
    """Choose Ewald or P3M parameters from error estimates (no timing runs).

    The real-space error decays as ``exp(-r_c²/(2s²))`` and the Ewald reciprocal error as
    ``exp(-s²k_c²/2)``; both are set to ``accuracy``. P3M's mesh spacing comes from the
    assignment-error estimate ``(h/(√2 s))^p``. The split ``s`` minimises a cost model.
    The resulting accuracy is checked against converged references in the tests.

    Args:
        cell: [3, 3] Å, rows are lattice vectors.
        n_atoms: number of atoms.
        smearing: Gaussian width σ of the charges (0 for point charges), Å.
        accuracy: requested relative accuracy of energies and forces.
        method: ``"auto"``, ``"ewald"`` or ``"p3m"``.
    """
    volume = abs(float(np.linalg.det(cell)))
    lengths = np.linalg.norm(cell, axis=1)
    # heights of the cell (distance between opposite faces)
    recip = np.linalg.inv(cell).T
    heights = 1.0 / np.linalg.norm(recip, axis=1)
    log_eps = math.log(1.0 / accuracy)
    density = n_atoms / volume
    if method == "auto":
        method = "ewald" if n_atoms <= 200 else "p3m"
    if method == "ewald":
        split = (volume * volume / max(n_atoms, 1)) ** (1.0 / 6.0) / math.sqrt(2.0 * math.pi)
        # the k-space sum needs at least a few shells; keep s comparable to the cell
        split = min(split, 0.5 * float(heights.min()))
        split = max(split, smearing)
        rcut = 0.0 if split <= smearing else split * math.sqrt(2.0 * (log_eps + 1.5))
        kcut = math.sqrt(2.0 * (log_eps + 1.5)) / split
        return EwaldParameters("ewald", split, rcut, kcut=kcut)
    if method != "p3m":
        raise ValueError(f"unknown electrostatics method {method!r}; use auto, ewald or p3m")
    # P3M: the relative force error measured against converged references on 2 cores
    # (benchmarks/calibrate_p3m.py) follows err ≈ C_p (a/s)^p for mesh spacing a and p
    # assignment nodes, with C_4 ≈ 0.06 and C_5 ≈ 0.045 (conservative ends of the
    # measured ranges). The cost model (seconds, float64, one thread) was fitted to the
    # same runs: 0.35 µs per real-space pair, 0.13 µs per mesh point, and 8.5 µs (p = 4)
    # or 14.6 µs (p = 5) per atom for charge assignment and interpolation.
    from ._mesh import fft_friendly

    best: Optional[Tuple[float, EwaldParameters]] = None
    for nodes, const, per_atom in ((4, 0.06, 8.5e-6), (5, 0.045, 14.6e-6)):
        spacing_over_split = (accuracy / const) ** (1.0 / nodes)
        for split in np.arange(0.8, 8.0, 0.05):
            split = max(float(split), smearing)
            rcut = 0.0 if split <= smearing else split * math.sqrt(2.0 * (log_eps + 1.0))
            spacing = spacing_over_split * split
            n_mesh = float(np.prod([max(8, fft_friendly(math.ceil(length / spacing))) for length in lengths]))
            n_pairs = 0.5 * n_atoms * density * 4.0 / 3.0 * math.pi * rcut**3
            cost = 0.35e-6 * n_pairs + 0.13e-6 * n_mesh + per_atom * n_atoms
            cand = EwaldParameters("p3m", split, rcut, mesh_spacing=spacing, interpolation_nodes=nodes)
            if best is None or cost < best[0]:
                best = (cost, cand)
    assert best is not None
    return best[1]


def ewald_kvectors(cell: torch.Tensor, kcut: float) -> torch.Tensor:
    """Reciprocal vectors ``k`` with ``0 < |k| < kcut`` in one half-space, [K, 3] 1/Å.

    Differentiable with respect to ``cell`` (the integer grid is chosen from a detached
    copy).
    """
    cell_d = cell.detach().cpu().double().numpy()
    grid = half_space_grid(np.linalg.norm(cell_d, axis=1), kcut)
    recip_d = 2.0 * math.pi * np.linalg.inv(cell_d).T
    kd = grid @ recip_d
    grid = grid[np.einsum("ki,ki->k", kd, kd) < kcut * kcut]
    recip = 2.0 * math.pi * torch.linalg.inv(cell).transpose(-1, -2)
    n = torch.as_tensor(grid, dtype=cell.dtype, device=cell.device)
    return n @ recip


def half_space_grid(lengths: np.ndarray, kcut: float) -> np.ndarray:
    """Integer reciprocal-lattice indices n ≠ 0 with one of each ±n pair.

    Args:
        lengths: [3] Å, lattice-vector lengths (the largest over a group of cells).
        kcut: reciprocal-space cutoff, 1/Å (the box of indices holds every |k| < kcut).

    Returns:
        [M, 3] int indices with n_x > 0, or n_x = 0 and n_y > 0, or n_x = n_y = 0 and n_z > 0.
    """
    nmax = np.ceil(kcut * np.asarray(lengths) / (2.0 * math.pi)).astype(int)
    ranges = [np.arange(-n, n + 1) for n in nmax]
    grid = np.stack(np.meshgrid(*ranges, indexing="ij"), axis=-1).reshape(-1, 3)
    keep = (grid[:, 0] > 0) | ((grid[:, 0] == 0) & (grid[:, 1] > 0))
    keep |= (grid[:, 0] == 0) & (grid[:, 1] == 0) & (grid[:, 2] > 0)
    return grid[keep]


def ewald_reciprocal_potential(
    positions: torch.Tensor,
    charges: torch.Tensor,
    cell: torch.Tensor,
    split: float,
    kcut: float,
    max_chunk_elements: int = 4_000_000,
) -> torch.Tensor:
    r"""Reciprocal-space potential of the Ewald sum (structure-factor form).

    .. math:: \phi_i = \frac{8\pi}{V} \sum_{k>0} \frac{e^{-s^2k^2/2}}{k^2}
              \operatorname{Re}\left[e^{-ik\cdot r_i} S(k)\right]

    Args:
        positions: [n_atoms, 3] Å.
        charges: [n_atoms, n_channels] e.
        cell: [3, 3] Å.
        split: Ewald width ``s``, Å.
        kcut: reciprocal cutoff, 1/Å.
        max_chunk_elements: bound on ``n_atoms × n_kvectors`` held at once (memory).

    Returns:
        [n_atoms, n_channels], the full potential (self term not removed), e/Å.
    """
    kvec = ewald_kvectors(cell, kcut)
    volume = cell_volume(cell)
    out = torch.zeros_like(charges)
    if kvec.shape[0] == 0:
        return out
    chunk = max(1, max_chunk_elements // max(positions.shape[0], 1))
    for start in range(0, kvec.shape[0], chunk):
        k = kvec[start : start + chunk]
        k2 = (k * k).sum(-1)
        green = torch.exp(-0.5 * split * split * k2) / k2  # [K]
        kr = positions @ k.T  # [N, K]
        cos, sin = torch.cos(kr), torch.sin(kr)
        s_re = charges.T @ cos  # [C, K]
        s_im = charges.T @ sin
        out = out + (cos @ (green[:, None] * s_re.T) + sin @ (green[:, None] * s_im.T))
    return out * (8.0 * math.pi / volume)
