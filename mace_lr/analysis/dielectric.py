"""Static dielectric constant from the fluctuations of the total dipole (tin-foil boundary)."""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np

from ._trajectory import (
    COULOMB,
    KB,
    Trajectory,
    block_error,
    kinetic_temperature,
    read_trajectory,
    resolve_charges,
    unwrapped_positions,
    volumes,
)


def _epsilon(m: np.ndarray, beta: float, volume: float) -> float:
    fluct = np.mean(np.sum(m**2, axis=1)) - np.sum(np.mean(m, axis=0) ** 2)
    return float(1.0 + 4.0 * np.pi * COULOMB * beta * fluct / (3.0 * volume))


def dielectric_constant(
    traj: Trajectory,
    charges=None,
    temperature: Optional[float] = None,
    dipoles: Optional[np.ndarray] = None,
    volume: Optional[float] = None,
    n_blocks: int = 5,
) -> Dict[str, np.ndarray]:
    """ε = 1 + 4π k_e β (⟨M²⟩ − ⟨M⟩²) / (3Ω) for a periodic system in tin-foil boundary conditions.

    M = Σ_i q_i R_i (e·Å) uses positions unwrapped across the periodic boundaries (see
    :func:`~mace_lr.analysis.unwrapped_positions`); k_e = 14.399645 eV·Å/e², β = 1/(k_B T).
    This is the dielectric constant of an insulator (molecular liquid, solid): in an ionic
    conductor M diffuses and its variance grows with the length of the run.

    Args:
        traj: list of Atoms or a trajectory file.
        charges: ``None`` (each frame's ``charges``), an array [n_atoms] or
            [n_frames, n_atoms] e, or a mapping element → charge. Ignored with ``dipoles``.
        temperature: K; ``None``: the kinetic temperature of the frames.
        dipoles: total dipoles [n_frames, 3] e·Å, e.g. a model's ``dipole`` results, instead
            of Σ q_i R_i.
        volume: Å³, instead of the cells' volume (mean over frames).
        n_blocks: consecutive blocks for the error bar (standard error of the block values).

    Returns:
        ``epsilon``, ``epsilon_err`` (block error), ``epsilon_blocks`` [n_blocks],
        ``running`` [n_frames] (ε from the first n frames), ``M`` [n_frames, 3] e·Å,
        ``M2_fluct`` ⟨M²⟩ − ⟨M⟩² (e²·Å²), ``temperature`` K, ``volume`` Å³.
    """
    frames = read_trajectory(traj)
    n_frames = len(frames)
    if n_frames < 2:
        raise ValueError("dipole fluctuations need at least 2 frames")
    omega = float(volumes(frames, volume, "the dielectric constant").mean())
    if dipoles is not None:
        m = np.asarray(dipoles, dtype=float)
        if m.shape != (n_frames, 3):
            raise ValueError(f"dipoles has shape {m.shape}, expected [{n_frames}, 3]")
    else:
        q = resolve_charges(frames, charges)
        m = np.einsum("fn,fnd->fd", q, unwrapped_positions(frames))
    if temperature is None:
        temperature = kinetic_temperature(frames)
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    beta = 1.0 / (KB * float(temperature))
    if not 1 <= n_blocks <= n_frames // 2:
        raise ValueError(f"n_blocks must be between 1 and n_frames/2 = {n_frames // 2}, got {n_blocks}")
    blocks = np.array([_epsilon(b, beta, omega) for b in np.array_split(m, n_blocks)])
    count = np.arange(1, n_frames + 1)[:, None]
    running_fluct = np.cumsum(np.sum(m**2, axis=1)) / count[:, 0] - np.sum(
        (np.cumsum(m, axis=0) / count) ** 2, 1
    )
    running = 1.0 + 4.0 * np.pi * COULOMB * beta * running_fluct / (3.0 * omega)
    eps = _epsilon(m, beta, omega)
    return {
        "epsilon": eps,
        "epsilon_err": block_error(blocks),
        "epsilon_blocks": blocks,
        "running": running,
        "M": m,
        "M2_fluct": float((eps - 1.0) * 3.0 * omega / (4.0 * np.pi * COULOMB * beta)),
        "temperature": float(temperature),
        "volume": omega,
    }
