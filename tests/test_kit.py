"""The block author's kit (mace_lr.nn): per-element options and positive parameters."""

import math

import pytest
import torch

from mace_lr.nn import element_number, element_values, softplus_inverse


def test_element_number_accepts_symbols_and_numbers():
    assert element_number("O") == 8
    assert element_number(8) == 8
    assert element_number("17") == 17
    for bad in ("Xx", "X", 0, 119, "o", None):
        with pytest.raises(ValueError, match="unknown element"):
            element_number(bad)


def test_element_values_in_model_order_with_defaults():
    # the base model's one-hot order, not the mapping's order
    values = element_values({"O": 6.0, 1: 1.5}, [8, 1, 6], "opt", default={6: 4.0}.get)
    assert values == [6.0, 1.5, 4.0]
    assert element_values(None, [1, 8], "opt", default=lambda z: float(z)) == [1.0, 8.0]


def test_element_values_errors_name_the_problem():
    with pytest.raises(
        ValueError, match=r"opt names element\(s\) Cl the base model does not know; it knows H, O"
    ):
        element_values({"Cl": 7.0}, [1, 8], "opt")
    with pytest.raises(ValueError, match="opt: no default charge for O; give it in opt"):
        element_values({"H": 1.0}, [1, 8], "opt", noun="charge")
    with pytest.raises(ValueError, match="opt: unknown element 'Qq'"):
        element_values({"Qq": 1.0}, [1], "opt")
    with pytest.raises(ValueError, match="the value for 'H' must be a number"):
        element_values({"H": "one"}, [1], "opt")
    with pytest.raises(ValueError, match="must map elements to numbers"):
        element_values([("H", 1.0)], [1], "opt")


@pytest.mark.parametrize("y", [1e-6, 0.3, 1.0, 7.5, 40.0])
def test_softplus_inverse_inverts_softplus(y):
    x = softplus_inverse(y)
    assert float(torch.nn.functional.softplus(torch.tensor(x, dtype=torch.float64))) == pytest.approx(
        y, rel=1e-12
    )
    assert math.isfinite(x)


def test_softplus_inverse_rejects_non_positive():
    with pytest.raises(ValueError, match="y > 0"):
        softplus_inverse(0.0)
