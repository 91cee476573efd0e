"""Size consistency: the energy of two far-apart fragments is the sum of their energies."""

from __future__ import annotations

from typing import Dict, Sequence

import numpy as np
from ase import Atoms

from ._trajectory import COULOMB


def _calculator(model_or_calculator):
    from ase.calculators.calculator import BaseCalculator

    if isinstance(model_or_calculator, BaseCalculator):
        return model_or_calculator
    from ..calculator import MACELRCalculator

    return MACELRCalculator(model_or_calculator)


def _energy(calc, atoms: Atoms) -> float:
    atoms = atoms.copy()
    atoms.calc = calc
    return float(atoms.get_potential_energy())


def size_consistency(
    model_or_calculator,
    fragment_a: Atoms,
    fragment_b: Atoms,
    distance: Sequence[float] = (20.0, 50.0, 100.0),
) -> Dict[str, np.ndarray]:
    """ΔU(d) = U(A…B at distance d) − U(A) − U(B) for open-boundary fragments.

    B is translated so that its centre of mass lies at ``d`` from A's along x. Each fragment's
    total charge is ``atoms.info["charge"]`` (default 0); the dimer carries the sum. For
    charged fragments a model with long-range electrostatics should give ΔU → k_e q_A q_B / d
    (the point-charge tail, returned as ``coulomb_tail``), a short-range model exactly 0 once
    d exceeds its receptive field.

    Args:
        model_or_calculator: an ASE calculator, a :class:`~mace_lr.LongRangeMACE` or a
            model file (wrapped in :class:`~mace_lr.calculator.MACELRCalculator`).
        fragment_a: the first fragment (``pbc`` False).
        fragment_b: the second fragment (``pbc`` False).
        distance: centre-of-mass separations, Å.

    Returns:
        ``distance`` [n] Å, ``delta`` [n] eV, ``coulomb_tail`` [n] eV, ``energy_a``,
        ``energy_b`` eV, ``charge_a``, ``charge_b`` e.
    """
    for name, frag in (("fragment_a", fragment_a), ("fragment_b", fragment_b)):
        if not isinstance(frag, Atoms) or len(frag) == 0:
            raise ValueError(f"{name} must be a non-empty ase.Atoms")
        if frag.pbc.any():
            raise ValueError(f"{name} is periodic; size consistency compares isolated fragments (pbc=False)")
    d = np.atleast_1d(np.asarray(distance, dtype=float))
    if np.any(d <= 0):
        raise ValueError(f"distances must be positive, got {d}")
    extent = max(np.ptp(fragment_a.positions, axis=0).max(), np.ptp(fragment_b.positions, axis=0).max())
    if np.any(d <= extent):
        raise ValueError(f"distance {d.min():g} Å does not separate fragments of extent {extent:.2f} Å")
    calc = _calculator(model_or_calculator)
    qa = float(fragment_a.info.get("charge", 0.0))
    qb = float(fragment_b.info.get("charge", 0.0))
    ea, eb = _energy(calc, fragment_a), _energy(calc, fragment_b)
    delta = []
    for r in d:
        b = fragment_b.copy()
        b.positions += fragment_a.get_center_of_mass() - b.get_center_of_mass() + np.array([r, 0.0, 0.0])
        dimer = fragment_a.copy() + b
        dimer.info = {"charge": qa + qb}
        delta.append(_energy(calc, dimer) - ea - eb)
    return {
        "distance": d,
        "delta": np.array(delta),
        "coulomb_tail": COULOMB * qa * qb / d,
        "energy_a": ea,
        "energy_b": eb,
        "charge_a": qa,
        "charge_b": qb,
    }
