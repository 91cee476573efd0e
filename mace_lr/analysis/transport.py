"""Ionic conductivity: Green–Kubo (charge current) and Einstein–Helfand (charge centre)."""

from __future__ import annotations

from typing import Dict, Mapping, Optional

import numpy as np
from ase import units

from ._trajectory import (
    KB,
    SIEMENS_PER_M,
    Trajectory,
    block_error,
    kinetic_temperature,
    known_oxidation_numbers,
    oxidation_charges,
    read_trajectory,
    unwrapped_positions,
    volumes,
)


def _autocorrelation(x: np.ndarray, n_lags: int) -> np.ndarray:
    """⟨x(t)·x(0)⟩ over all time origins for lags 0..n_lags-1; x: [T, 3]."""
    t = len(x)
    size = 1 << int(np.ceil(np.log2(2 * t)))
    f = np.fft.rfft(x, n=size, axis=0)
    acf = np.fft.irfft(np.sum(f * np.conj(f), axis=1), n=size)[:n_lags]
    return acf / (t - np.arange(n_lags))


def _msd(d: np.ndarray, n_lags: int) -> np.ndarray:
    """⟨|d(t+τ) − d(t)|²⟩ over all time origins for τ = 0..n_lags-1; d: [T, 3]."""
    t = len(d)
    sq = np.sum(d**2, axis=1)
    acf = _autocorrelation(d, n_lags) * (t - np.arange(n_lags))
    cum = np.concatenate([[0.0], np.cumsum(sq)])
    total = cum[t]
    lags = np.arange(n_lags)
    # Σ_t |d(t+τ)|² + |d(t)|² over t = 0..T-τ-1
    s = (total - cum[lags]) + cum[t - lags]
    return (s - 2.0 * acf) / (t - lags)


def _estimates(j, d, dt, n_lags, fit_start, prefactor):
    """GK running integral, EH running slope, the GK and EH values (e²/(eV·Å·fs))."""
    c = _autocorrelation(j, n_lags)  # (e·Å/fs)²
    gk_running = prefactor * np.concatenate([[0.0], np.cumsum(0.5 * (c[1:] + c[:-1])) * dt])
    msd = _msd(d, n_lags)  # (e·Å)²
    lag_t = np.arange(n_lags) * dt
    sel = slice(fit_start, n_lags)
    slope = np.polyfit(lag_t[sel], msd[sel], 1)[0]
    return c, gk_running, msd, prefactor * slope / 2.0


def conductivity_from_arrays(
    positions: np.ndarray,
    velocities: np.ndarray,
    charges: np.ndarray,
    volume: float,
    temperature: float,
    dt: float,
    max_lag: Optional[float] = None,
    fit_start: Optional[float] = None,
    n_blocks: int = 5,
) -> Dict[str, np.ndarray]:
    """Green–Kubo and Einstein–Helfand conductivity from arrays (see :func:`ionic_conductivity`).

    Args:
        positions: unwrapped [n_frames, n_atoms, 3] Å.
        velocities: [n_frames, n_atoms, 3] Å/fs.
        charges: oxidation numbers [n_atoms] e.
        volume: Å³.
        temperature: K.
        dt: time between frames, fs.
        max_lag: longest correlation time (fs); default a tenth of the run.
        fit_start: start of the Einstein–Helfand linear fit (fs); default max_lag / 2.
        n_blocks: consecutive blocks for the error bars.
    """
    pos = np.asarray(positions, dtype=float)
    vel = np.asarray(velocities, dtype=float)
    z = np.asarray(charges, dtype=float)
    n_frames, n_atoms = pos.shape[:2]
    if vel.shape != pos.shape or pos.shape[2:] != (3,):
        raise ValueError(
            f"positions {pos.shape} and velocities {vel.shape} must both be [n_frames, n_atoms, 3]"
        )
    if z.shape != (n_atoms,):
        raise ValueError(f"charges has shape {z.shape}, expected [{n_atoms}]")
    if dt <= 0 or volume <= 0 or temperature <= 0:
        raise ValueError(f"dt, volume and temperature must be positive (got {dt}, {volume}, {temperature})")
    frames_per_block = n_frames // n_blocks
    n_lags = int(round((max_lag if max_lag is not None else 0.1 * n_frames * dt) / dt)) + 1
    if n_lags < 3 or n_lags > frames_per_block // 2:
        raise ValueError(
            f"max_lag must span at least 2 frames and at most half a block "
            f"({frames_per_block // 2 - 1} frames "
            f"= {(frames_per_block // 2 - 1) * dt:g} fs with n_blocks={n_blocks}); got {n_lags - 1} frames"
        )
    start = int(round(fit_start / dt)) if fit_start is not None else (n_lags - 1) // 2
    if not 0 <= start <= n_lags - 3:
        raise ValueError(
            f"fit_start must lie in [0, max_lag) with at least 3 lags to fit, got {start} frames"
        )
    j = np.einsum("n,fnd->fd", z, vel)  # e·Å/fs
    d = np.einsum("n,fnd->fd", z, pos)  # e·Å
    prefactor = 1.0 / (3.0 * volume * KB * temperature)  # 1/(Å³ eV)
    c, gk_running, msd, eh = _estimates(j, d, dt, n_lags, start, prefactor)
    gk_blocks, eh_blocks = [], []
    for b in range(n_blocks):
        sl = slice(b * frames_per_block, (b + 1) * frames_per_block)
        _, gk_b, _, eh_b = _estimates(j[sl], d[sl], dt, n_lags, start, prefactor)
        gk_blocks.append(gk_b[-1])
        eh_blocks.append(eh_b)
    to_si = SIEMENS_PER_M
    return {
        "sigma_gk": float(gk_running[-1] * to_si),
        "sigma_gk_err": block_error(np.array(gk_blocks)) * to_si,
        "sigma_eh": float(eh * to_si),
        "sigma_eh_err": block_error(np.array(eh_blocks)) * to_si,
        "sigma_nernst_einstein": float(_nernst_einstein(pos, z, dt, n_lags, start, prefactor) * to_si),
        "time": np.arange(n_lags) * dt,
        "current_acf": c,
        "gk_running": gk_running * to_si,
        "msd_charge": msd,
        "fit_start": start * dt,
        "temperature": float(temperature),
        "volume": float(volume),
    }


def _nernst_einstein(pos, z, dt, n_lags, start, prefactor) -> float:
    """σ_NE = β/(3Ω) Σ_i z_i² · (slope of ⟨|Δr_i|²⟩)/2: no cross-correlations between ions."""
    lag_t = np.arange(n_lags) * dt
    total = 0.0
    for i in np.flatnonzero(z):
        msd = _msd(pos[:, i], n_lags)
        total += z[i] ** 2 * np.polyfit(lag_t[start:], msd[start:], 1)[0] / 2.0
    return prefactor * total


def ionic_conductivity(
    traj: Trajectory,
    dt: float,
    oxidation_numbers=None,
    temperature: Optional[float] = None,
    max_lag: Optional[float] = None,
    fit_start: Optional[float] = None,
    n_blocks: int = 5,
    volume: Optional[float] = None,
) -> Dict[str, np.ndarray]:
    """Ionic conductivity σ (S/m) by Green–Kubo and by Einstein–Helfand, with block error bars.

    * Green–Kubo: σ = β/(3Ω) ∫₀^τmax ⟨J(t)·J(0)⟩ dt with the charge current J = Σ_i z_i v_i.
    * Einstein–Helfand: σ = β/(6Ω) d⟨|D(t) − D(0)|²⟩/dt with D = Σ_i z_i R_i on unwrapped
      positions, the slope fitted between ``fit_start`` and ``max_lag``.

    The two agree (within error bars) once the current correlation has decayed before
    ``fit_start``. Charges are **integer oxidation numbers** z_i: for an ionic conductor
    gauge invariance makes them exact, whereas a model's latent charges are not Born
    charges. They are taken automatically only for monatomic ions of known charge
    (alkali, alkaline-earth, halide); anything else must be given. ``sigma_nernst_einstein``
    (self-diffusion only, no ion–ion cross-correlations) is returned for comparison.

    Args:
        traj: list of Atoms with velocities (an MD trajectory at a constant cell), or a file.
        dt: time between frames, fs.
        oxidation_numbers: mapping element → integer charge, or an array [n_atoms];
            ``None``: :data:`~mace_lr.analysis.KNOWN_IONS`, error for other elements.
        temperature: K; ``None``: the kinetic temperature of the frames.
        max_lag: longest correlation time (fs); default a tenth of the run.
        fit_start: start of the Einstein–Helfand fit (fs); default max_lag / 2.
        n_blocks: consecutive blocks for the error bars.
        volume: Å³ instead of the cell's.

    Returns:
        ``sigma_gk``, ``sigma_gk_err``, ``sigma_eh``, ``sigma_eh_err``,
        ``sigma_nernst_einstein`` (S/m), ``time`` [n_lags] fs, ``current_acf`` [n_lags]
        (e·Å/fs)², ``gk_running`` [n_lags] S/m, ``msd_charge`` [n_lags] (e·Å)², ``fit_start``
        fs, ``temperature`` K, ``volume`` Å³.
    """
    frames = read_trajectory(traj)
    numbers = frames[0].numbers
    if oxidation_numbers is None:
        z = known_oxidation_numbers(numbers)
    elif isinstance(oxidation_numbers, Mapping):
        z = oxidation_charges(numbers, oxidation_numbers)
    else:
        z = np.asarray(oxidation_numbers, dtype=float)
        if z.shape != (len(numbers),):
            raise ValueError(f"oxidation_numbers has shape {z.shape}, expected [{len(numbers)}] (n_atoms)")
    vel = np.stack([a.get_velocities() for a in frames]) * units.fs  # Å/fs
    if not np.any(vel):
        raise ValueError("the frames carry no velocities: Green–Kubo needs an MD trajectory with momenta")
    if temperature is None:
        temperature = kinetic_temperature(frames)
    omega = float(volumes(frames, volume, "the conductivity").mean())
    return conductivity_from_arrays(
        unwrapped_positions(frames), vel, z, omega, temperature, dt, max_lag, fit_start, n_blocks
    )
