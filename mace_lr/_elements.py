"""Per-element block options: user mappings by symbol or number, in the base model's order."""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence


def element_number(key: Any) -> int:
    """Atomic number of an element given as symbol (``"O"``) or number (``8`` or ``"8"``).

    Raises:
        ValueError: for an unknown symbol or a number outside 1–118.
    """
    from ase.data import atomic_numbers as by_symbol

    if isinstance(key, str) and not key.strip().isdigit():
        if key not in by_symbol or by_symbol[key] == 0:
            raise ValueError(f"unknown element {key!r}")
        return int(by_symbol[key])
    try:
        z = int(key)
    except (TypeError, ValueError):
        raise ValueError(f"unknown element {key!r}") from None
    if not 1 <= z <= 118:
        raise ValueError(f"unknown element {key!r} (atomic numbers run from 1 to 118)")
    return z


def element_values(
    mapping: Optional[Mapping[Any, float]],
    atomic_numbers: Sequence[int],
    what: str,
    default: Optional[Callable[[int], Optional[float]]] = None,
    noun: str = "value",
) -> List[float]:
    """One value per element of the base model, from a user mapping element → number.

    Args:
        mapping: element (symbol or atomic number) → value; ``None`` for an empty mapping.
        atomic_numbers: the base model's elements, in its one-hot order.
        what: the option's name, for error messages (e.g. ``"wannier `ion_charges`"``).
        default: value of an element the mapping omits (``None`` from it: no default,
            which is an error); without it, omitted elements are an error.
        noun: what a value is, for error messages (e.g. ``"ion charge"``).

    Returns:
        [n_elements] floats in the order of ``atomic_numbers``.

    Raises:
        ValueError: the mapping is not a mapping, names an unknown element or one the
            base model does not know, holds a non-number, or misses an element that has
            no default.
    """
    from ase.data import chemical_symbols

    mapping = {} if mapping is None else mapping
    if not isinstance(mapping, Mapping):
        raise ValueError(f"{what} must map elements to numbers, got {mapping!r}")
    by_z: Dict[int, float] = {}
    for key, value in mapping.items():
        try:
            z = element_number(key)
        except ValueError as err:
            raise ValueError(f"{what}: {err}") from None
        try:
            by_z[z] = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{what}: the value for {key!r} must be a number, got {value!r}") from None
    known = [int(z) for z in atomic_numbers]
    extra = sorted(set(by_z) - set(known))
    if extra:
        raise ValueError(
            f"{what} names element(s) {', '.join(chemical_symbols[z] for z in extra)} the base "
            f"model does not know; it knows {', '.join(sorted(chemical_symbols[z] for z in known))}"
        )
    values: List[float] = []
    for z in known:
        value = by_z.get(z)
        if value is None and default is not None:
            value = default(z)
        if value is None:
            raise ValueError(f"{what}: no default {noun} for {chemical_symbols[z]}; give it in {what}")
        values.append(float(value))
    return values


def softplus_inverse(y: float) -> float:
    """The x > −∞ with softplus(x) = log(1 + eˣ) = y, for y > 0 (raw parameter of a positive one)."""
    if not y > 0.0:
        raise ValueError(f"softplus_inverse needs y > 0, got {y}")
    return y + math.log(-math.expm1(-y))
