"""Reading trajectories and charges for the diagnostics (shared helpers)."""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
from ase import Atoms
from ase.data import atomic_numbers as _ATOMIC_NUMBERS

#: Coulomb constant k_e = 1/(4πε0) in eV·Å/e² (DESIGN.md units).
COULOMB = 14.399645
#: Boltzmann constant in eV/K.
KB = 8.617333262e-5
#: 1 e²/(eV·Å·fs) in S/m: (1.602176634e-19 C/V) / (1e-10 m · 1e-15 s).
SIEMENS_PER_M = 1.602176634e-19 / 1e-25

#: Oxidation numbers of monatomic ions taken without being asked (ionic melts and salts).
KNOWN_IONS: Dict[int, int] = {
    **{z: 1 for z in (3, 11, 19, 37, 55)},  # Li Na K Rb Cs
    **{z: 2 for z in (12, 20, 38, 56)},  # Mg Ca Sr Ba
    **{z: -1 for z in (9, 17, 35, 53)},  # F Cl Br I
}

Trajectory = Union[str, Sequence[Atoms]]


def read_trajectory(traj: Trajectory, index: Union[str, slice] = ":") -> List[Atoms]:
    """A list of frames from a list of Atoms, one Atoms, or a file ``ase.io.read`` reads."""
    if isinstance(traj, Atoms):
        return [traj]
    if isinstance(traj, (str, bytes)) or hasattr(traj, "__fspath__"):
        from ase.io import read

        frames = read(traj, index)
        frames = frames if isinstance(frames, list) else [frames]
    else:
        frames = list(traj)
    if not frames:
        raise ValueError("the trajectory has no frames")
    if not all(isinstance(a, Atoms) for a in frames):
        raise TypeError("a trajectory is a list of ase.Atoms or a file path readable by ase.io.read")
    n = len(frames[0])
    for i, atoms in enumerate(frames):
        if len(atoms) != n:
            raise ValueError(
                f"frame {i} has {len(atoms)} atoms, frame 0 has {n}: the atoms must stay the same"
            )
    return frames


def _frame_charges(atoms: Atoms, index: int) -> np.ndarray:
    if "charges" in atoms.arrays:
        return np.asarray(atoms.arrays["charges"], dtype=float)
    calc = atoms.calc
    if calc is not None and "charges" in getattr(calc, "results", {}):
        return np.asarray(calc.results["charges"], dtype=float)
    raise ValueError(
        f"frame {index} has no per-atom charges (atoms.arrays['charges'] or calculator results "
        "'charges'); pass charges= an array [n_atoms] or [n_frames, n_atoms] or a mapping "
        "element → oxidation number"
    )


def oxidation_charges(numbers: np.ndarray, mapping: Mapping) -> np.ndarray:
    """Per-atom charges [N] e from a mapping of element symbol or atomic number → charge."""
    table = {}
    for key, value in mapping.items():
        z = _ATOMIC_NUMBERS[key] if isinstance(key, str) else int(key)
        table[z] = float(value)
    missing = sorted({int(z) for z in numbers} - set(table))
    if missing:
        from ase.data import chemical_symbols

        raise ValueError(f"no charge given for element(s) {[chemical_symbols[z] for z in missing]}")
    return np.array([table[int(z)] for z in numbers], dtype=float)


def resolve_charges(frames: Sequence[Atoms], charges=None) -> np.ndarray:
    """Charges [n_frames, n_atoms] e.

    Args:
        frames: the trajectory.
        charges: ``None`` (each frame's own ``charges``: ``atoms.arrays`` or calculator
            results, e.g. a model's predicted charges), an array [n_atoms] (the same every
            frame) or [n_frames, n_atoms], or a mapping element → charge (oxidation numbers).
    """
    n_frames, n_atoms = len(frames), len(frames[0])
    if charges is None:
        out = np.stack([_frame_charges(a, i) for i, a in enumerate(frames)])
    elif isinstance(charges, Mapping):
        out = np.stack([oxidation_charges(a.numbers, charges) for a in frames])
    else:
        out = np.asarray(charges, dtype=float)
        if out.ndim == 1:
            if out.shape[0] != n_atoms:
                raise ValueError(f"charges has length {out.shape[0]}, the frames have {n_atoms} atoms")
            out = np.broadcast_to(out, (n_frames, n_atoms))
        elif out.shape != (n_frames, n_atoms):
            raise ValueError(
                f"charges has shape {out.shape}; expected [{n_atoms}] or [{n_frames}, {n_atoms}] "
                "(n_frames, n_atoms)"
            )
    if out.shape[1] != n_atoms:
        raise ValueError(f"a frame's charges have length {out.shape[1]}, the frames have {n_atoms} atoms")
    if not np.all(np.isfinite(out)):
        raise ValueError("charges contain NaN or inf")
    return np.ascontiguousarray(out)


def known_oxidation_numbers(numbers: np.ndarray) -> np.ndarray:
    """Integer oxidation numbers [N] of monatomic ions in :data:`KNOWN_IONS`; error otherwise."""
    unknown = sorted({int(z) for z in numbers} - set(KNOWN_IONS))
    if unknown:
        from ase.data import chemical_symbols

        raise ValueError(
            f"element(s) {[chemical_symbols[z] for z in unknown]} are not known monatomic ions; pass "
            "oxidation_numbers= explicitly (a mapping element → integer charge, or an array [n_atoms]). "
            "The model's latent charges are not Born charges and are never used silently"
        )
    return np.array([KNOWN_IONS[int(z)] for z in numbers], dtype=float)


def volumes(
    frames: Sequence[Atoms], volume: Optional[float] = None, what: str = "this diagnostic"
) -> np.ndarray:
    """Cell volume of every frame [n_frames] Å³ (or the given ``volume``)."""
    if volume is not None:
        if volume <= 0:
            raise ValueError(f"volume must be positive, got {volume}")
        return np.full(len(frames), float(volume))
    out = np.array([abs(a.cell.volume) for a in frames])
    if np.any(out <= 1e-12):
        raise ValueError(f"{what} needs a volume: the frames have no 3D cell; set atoms.cell or pass volume=")
    return out


def unwrapped_positions(frames: Sequence[Atoms]) -> np.ndarray:
    """Positions [n_frames, n_atoms, 3] Å made continuous across periodic boundaries.

    A displacement between consecutive frames is replaced by its minimum image along the
    periodic directions, so atoms must move less than half a cell length between frames.
    Positions that were never wrapped (ASE's MD does not wrap) come back unchanged.
    """
    pos = np.stack([a.positions for a in frames])
    if len(frames) < 2 or not frames[0].pbc.any():
        return pos
    cell = frames[0].cell.array
    pbc = frames[0].pbc
    steps = np.diff(pos, axis=0)
    frac = steps @ np.linalg.inv(cell)
    frac[..., pbc] -= np.round(frac[..., pbc])
    steps = frac @ cell
    return np.concatenate([pos[:1], pos[:1] + np.cumsum(steps, axis=0)])


def kinetic_temperature(frames: Sequence[Atoms]) -> float:
    """Mean kinetic temperature (K) of the frames (3N degrees of freedom)."""
    temps = [a.get_temperature() for a in frames if a.get_momenta() is not None]
    if not temps or not np.any(np.stack([a.get_momenta() for a in frames]) != 0):
        raise ValueError("the frames carry no velocities; pass temperature= (K)")
    return float(np.mean(temps))


def block_error(values: np.ndarray) -> float:
    """Standard error of the mean of independent block estimates."""
    values = np.asarray(values, dtype=float)
    if values.size < 2:
        return float("nan")
    return float(values.std(ddof=1) / np.sqrt(values.size))
