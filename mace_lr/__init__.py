"""mace-lr: long-range blocks for MACE interatomic potentials.

Public surface (see DESIGN): :func:`augment`, :func:`load`, :func:`save`, the registry
functions, :class:`LongRangeBlock` (with its declarations :class:`Input`, :class:`Output`
and :class:`Target`), :class:`LongRangeMACE`, :class:`MACELRCalculator`,
the :mod:`mace_lr.electrostatics` engine and the :mod:`mace_lr.testing` contract tests.
"""

import mace as _mace  # noqa: F401  (mace sets the variable e3nn needs; import it first)

from ._block import LongRangeBlock
from ._io import load, save
from ._model import LongRangeMACE, augment
from ._outputs import Input, Output, Target
from .registry import available_blocks, get_block, register_block

__version__ = "0.1.0"


def __getattr__(name):
    # the calculator pulls in ASE; import it lazily
    if name == "MACELRCalculator":
        from .calculator import MACELRCalculator

        return MACELRCalculator
    raise AttributeError(f"module 'mace_lr' has no attribute {name!r}")


__all__ = [
    "Input",
    "LongRangeBlock",
    "LongRangeMACE",
    "MACELRCalculator",
    "Output",
    "Target",
    "augment",
    "available_blocks",
    "get_block",
    "load",
    "register_block",
    "save",
]
