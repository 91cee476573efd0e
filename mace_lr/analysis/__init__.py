"""Diagnostics that judge long-range blocks (physics.md, "Diagnostics").

Each function returns data (numpy arrays and floats); the ``plot_*`` functions write PNGs.

* :func:`charge_structure_factor` — S_QQ(k) on the cell's reciprocal lattice, with the
  small-k k² fit and the Stillinger–Lovett slope of perfect screening;
* :func:`dielectric_constant` — ε from total-dipole fluctuations (tin-foil boundary);
* :func:`ionic_conductivity` — Green–Kubo and Einstein–Helfand σ (S/m) with integer
  oxidation numbers;
* :func:`size_consistency` — U(A…B far apart) − U(A) − U(B), charged fragments included;
* :func:`locality_probe` — ``‖∂q_i/∂R_k‖`` against ``|R_i − R_k|``.

Trajectories are lists of ``ase.Atoms`` or files ``ase.io.read(path, ":")`` reads. Charges
come from each frame (``atoms.arrays["charges"]`` or the calculator's ``charges``, e.g. a
model's predictions), or are given as an array or a mapping element → oxidation number.
Command line: ``mace_lr_analyze {sqq,dielectric,conductivity} trajectory.xyz``.
"""

from ._trajectory import (
    COULOMB,
    KNOWN_IONS,
    SIEMENS_PER_M,
    read_trajectory,
    resolve_charges,
    unwrapped_positions,
)
from .dielectric import dielectric_constant
from .locality import locality_probe, plot_locality
from .plots import plot_conductivity, plot_dielectric, plot_size_consistency, plot_sqq
from .size import size_consistency
from .structure import charge_structure_factor, reciprocal_vectors
from .transport import conductivity_from_arrays, ionic_conductivity

__all__ = [
    "COULOMB",
    "KNOWN_IONS",
    "SIEMENS_PER_M",
    "charge_structure_factor",
    "conductivity_from_arrays",
    "dielectric_constant",
    "ionic_conductivity",
    "locality_probe",
    "plot_conductivity",
    "plot_dielectric",
    "plot_locality",
    "plot_size_consistency",
    "plot_sqq",
    "read_trajectory",
    "reciprocal_vectors",
    "resolve_charges",
    "size_consistency",
    "unwrapped_positions",
]
