"""Foundation-model-sized backbones (published MACE-MP-0 / MACE-OFF23 architectures, random weights)."""

import mace  # noqa: F401
import pytest
import torch

import mace_lr
from mace_lr import testing as T


@pytest.fixture(scope="module")
def mp0_small():
    return T.make_foundation_like_model("mp0-small")


def test_architectures():
    base = T.make_foundation_like_model("off23-small", dtype=torch.float32)
    assert float(base.r_max) == 4.5
    assert base.atomic_numbers.tolist() == [1, 6, 7, 8, 9, 15, 16, 17, 35, 53]
    assert str(base.products[0].linear.irreps_out) == "96x0e"
    assert next(base.parameters()).dtype == torch.float32
    with pytest.raises(ValueError, match="unknown architecture 'mp9'"):
        T.make_foundation_like_model("mp9")


def test_mp0_small_architecture(mp0_small):
    assert float(mp0_small.r_max) == 6.0
    assert len(mp0_small.atomic_numbers) == 89
    assert str(mp0_small.products[0].linear.irreps_out) == "128x0e"
    assert len(mp0_small.interactions) == 2


@pytest.mark.parametrize("block", ["les", "qeq"])
def test_identity_at_init_on_mp0_small(mp0_small, block):
    model = mace_lr.augment(mp0_small, block)
    systems = T.reference_systems()
    T.assert_identity_at_init(mp0_small, model, [systems["open"], systems["periodic"]])


def test_les_contract_on_mp0_small(mp0_small):
    T.run_block_contract("les", config={"smearing": 1.2}, base=mp0_small)
