"""Charge structure factor S_QQ(k) on the reciprocal lattice of the simulation cell.

Implementation choice: a vectorised numpy sum over the cell's reciprocal-lattice vectors,
not dynasor. S_QQ(k) needs only the static charge density ρ_Q(k) = Σ_i q_i e^{−ik·R_i} per
frame, which is one matrix product per frame. dynasor (not a dependency of mace-lr) is built
for dynamical structure factors S(q, ω) of species densities and takes its own trajectory
readers and per-species weights; with per-frame model charges it would add a dependency and
a data conversion for a few lines of numpy.
"""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np

from ._trajectory import COULOMB, KB, Trajectory, kinetic_temperature, read_trajectory, resolve_charges


def reciprocal_vectors(cell: np.ndarray, kmax: float) -> np.ndarray:
    """All reciprocal-lattice vectors k = 2π G with 0 < |k| ≤ kmax, [n_k, 3] Å⁻¹ (one of ±k)."""
    recip = 2.0 * np.pi * np.linalg.inv(cell).T  # rows b_j with a_i · b_j = 2π δ_ij
    # |n_j| ≤ kmax / (distance between lattice planes normal to b_j) · ... : bound by kmax·|a_j|/2π
    nmax = np.floor(kmax * np.linalg.norm(cell, axis=1) / (2.0 * np.pi)).astype(int)
    ranges = [np.arange(-m, m + 1) for m in nmax]
    n = np.stack(np.meshgrid(*ranges, indexing="ij"), axis=-1).reshape(-1, 3)
    # keep one of each ±n pair (S(k) = S(−k) for real charges)
    first = np.argmax(n != 0, axis=1)
    positive = n[np.arange(len(n)), first] > 0
    n = n[positive]
    k = n @ recip
    keep = np.linalg.norm(k, axis=1) <= kmax * (1 + 1e-12)
    return k[keep]


def charge_structure_factor(
    traj: Trajectory,
    charges=None,
    kmax: float = 2.0,
    bin_width: Optional[float] = None,
    n_fit: int = 3,
    temperature: Optional[float] = None,
    n_blocks: Optional[int] = None,
) -> Dict[str, np.ndarray]:
    """Spherically averaged charge structure factor S_QQ(k) = ⟨|ρ_Q(k)|²⟩ / N (e²).

    ρ_Q(k) = Σ_i q_i exp(−i k·R_i) on the reciprocal lattice of the cell (the first frame's;
    the cell must stay fixed), averaged over frames and over the vectors in each |k| bin.

    Stillinger–Lovett (perfect screening by long-range Coulomb) fixes the small-k limit:
    S_QQ(k) → Σ_i x_i q_i² · k²/k_D² = k² / (4π β k_e n), with the Debye wavenumber
    k_D² = 4π β k_e Σ_s n_s q_s², n = N/Ω the number density, x_s the species' fractions.
    A short-range model has no such constraint and leaves S_QQ(0) finite.

    Args:
        traj: list of Atoms or a trajectory file (periodic 3D cell).
        charges: ``None`` (each frame's ``charges``, e.g. predicted by a model's
            calculator), an array [n_atoms] or [n_frames, n_atoms] e, or a mapping element →
            oxidation number.
        kmax: largest |k| (Å⁻¹).
        bin_width: |k| bin width (Å⁻¹); ``None`` groups vectors of equal |k| (shells, exact
            for cubic cells; rounded to 1e-6 Å⁻¹).
        n_fit: number of smallest-|k| bins in the least-squares fit S ≈ A k² (through 0).
        temperature: K, for the Stillinger–Lovett slope; ``None``: the kinetic temperature
            of the frames, or no prediction when they carry no velocities.
        n_blocks: ``None``: ``S_err`` is the standard error over frames, right for
            independent frames only; an integer: the standard error of the means of that many
            consecutive blocks of frames (use it for MD, whose frames are correlated).

    Returns:
        ``k`` [n_bins] Å⁻¹ (mean |k| of each bin), ``S`` [n_bins] e², ``S_err`` [n_bins]
        (standard error over frames, or over blocks with ``n_blocks``), ``count`` [n_bins]
        (vectors per bin), ``fit_slope`` A (e²·Å²) of S ≈ A k² on the first ``n_fit`` bins,
        ``sl_slope`` 1/(4π β k_e n) (e²·Å², NaN without a temperature), ``q2_mean`` ⟨q²⟩ e²
        (the uncorrelated value), ``temperature`` K, ``n_frames``, and unbinned
        ``k_vectors`` [n_k, 3] Å⁻¹ (one of each ±k pair) with ``S_k`` [n_k] e².
    """
    frames = read_trajectory(traj)
    q = resolve_charges(frames, charges)
    cell = frames[0].cell.array
    if not frames[0].pbc.all() or abs(np.linalg.det(cell)) < 1e-12:
        raise ValueError("S_QQ(k) needs a periodic 3D cell (atoms.pbc all True and a non-degenerate cell)")
    for i, atoms in enumerate(frames):
        if not np.allclose(atoms.cell.array, cell, atol=1e-8):
            raise ValueError(
                f"frame {i} has a different cell: S_QQ(k) on a fixed reciprocal lattice needs NVT/NVE"
            )
    if kmax <= 0:
        raise ValueError(f"kmax must be positive, got {kmax}")
    if n_blocks is not None and not 2 <= n_blocks <= len(frames):
        raise ValueError(f"n_blocks must lie in [2, n_frames = {len(frames)}], got {n_blocks}")
    kvec = reciprocal_vectors(cell, kmax)
    if len(kvec) == 0:
        raise ValueError(f"no reciprocal-lattice vector with |k| ≤ kmax = {kmax} Å⁻¹; the cell is too small")
    n_atoms = len(frames[0])
    s_fk = np.empty((len(frames), len(kvec)))  # [F, K], one frame at a time to bound memory
    for f, atoms in enumerate(frames):
        phase = atoms.positions @ kvec.T  # [N, K]
        s_fk[f] = ((q[f] @ np.cos(phase)) ** 2 + (q[f] @ np.sin(phase)) ** 2) / n_atoms

    kn = np.linalg.norm(kvec, axis=1)
    if bin_width is None:
        keys = np.round(kn, 6)
    else:
        keys = np.floor(kn / bin_width)
    uniq, inverse = np.unique(keys, return_inverse=True)
    count = np.bincount(inverse)
    k_bin = np.bincount(inverse, weights=kn) / count
    s_frame_bin = np.stack([np.bincount(inverse, weights=row) / count for row in s_fk])  # [F, B]
    s_bin = s_frame_bin.mean(axis=0)
    n_frames = len(frames)
    if n_blocks is not None:
        per_block = n_frames // n_blocks  # consecutive blocks; the last n_frames % n_blocks frames left out
        means = s_frame_bin[: per_block * n_blocks].reshape(n_blocks, per_block, -1).mean(axis=1)
        s_err = means.std(axis=0, ddof=1) / np.sqrt(n_blocks)
    elif n_frames > 1:
        s_err = s_frame_bin.std(axis=0, ddof=1) / np.sqrt(n_frames)
    else:
        s_err = np.full_like(s_bin, np.nan)
    m = min(n_fit, len(k_bin))
    x = k_bin[:m] ** 2
    fit_slope = float(np.dot(x, s_bin[:m]) / np.dot(x, x))

    if temperature is None:
        try:
            temperature = kinetic_temperature(frames)
        except ValueError:
            temperature = float("nan")
    density = n_atoms / abs(np.linalg.det(cell))
    sl_slope = KB * float(temperature) / (4.0 * np.pi * COULOMB * density)
    return {
        "k": k_bin,
        "S": s_bin,
        "S_err": s_err,
        "count": count,
        "fit_slope": fit_slope,
        "sl_slope": float(sl_slope),
        "q2_mean": float(np.mean(q**2)),
        "temperature": float(temperature),
        "n_frames": n_frames,
        "k_vectors": kvec,
        "S_k": s_fk.mean(axis=0),
    }
