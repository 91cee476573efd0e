import numpy as np
import pytest
import torch

import mace_lr
from mace_lr import testing as T
from mace_lr._io import MissingBlockError


@pytest.fixture(scope="module")
def base():
    return T.make_test_model()


@pytest.fixture(scope="module")
def systems():
    return T.reference_systems()


def test_les_block_contract():
    T.run_block_contract("les", config={"smearing": 1.2})


@pytest.mark.parametrize("kind", ["scaleshift", "plain", "multihead"])
def test_identity_at_init_float64(kind, systems):
    if kind == "scaleshift":
        base = T.make_test_model(seed=3)
    elif kind == "multihead":
        base = T.make_test_model(seed=4, heads=["pbe", "r2scan"])
    else:
        from e3nn import o3
        from mace.modules import MACE, RealAgnosticResidualInteractionBlock

        torch.set_default_dtype(torch.float64)
        try:
            base = MACE(
                r_max=4.0,
                num_bessel=6,
                num_polynomial_cutoff=5,
                max_ell=1,
                interaction_cls=RealAgnosticResidualInteractionBlock,
                interaction_cls_first=RealAgnosticResidualInteractionBlock,
                num_interactions=2,
                num_elements=2,
                hidden_irreps=o3.Irreps("4x0e+4x1o"),
                MLP_irreps=o3.Irreps("8x0e"),
                atomic_energies=np.array([-1.0, -2.0]),
                avg_num_neighbors=6.0,
                atomic_numbers=[11, 17],
                correlation=2,
                gate=torch.nn.functional.silu,
            )
        finally:
            torch.set_default_dtype(torch.float32)
    model = mace_lr.augment(base, "les")
    T.assert_identity_at_init(base, model, list(systems.values()), atol=1e-10)


def test_identity_at_init_float32(systems):
    base = T.make_test_model(dtype=torch.float32)
    model = mace_lr.augment(base, "les")
    assert next(model.blocks.parameters()).dtype == torch.float32
    T.assert_identity_at_init(base, model, [systems["periodic"], systems["open"]], atol=1e-6)


def test_stress_includes_long_range_term(base, systems):
    # the LES energy depends on the cell: with charges switched on the stress must change
    model = T.perturb_blocks(mace_lr.augment(base, "les"))
    plain = T.evaluate(base, [systems["periodic"]], compute_stress=True)["stress"]
    full = T.evaluate(model, [systems["periodic"]], compute_stress=True)["stress"]
    assert float((full - plain).abs().max()) > 1e-4
    T.assert_stress_matches_finite_differences(model, systems["triclinic"])


def test_training_starts_off_the_saddle(base, systems):
    # at initialisation the energy is exactly the base's, but the loss gradient with respect
    # to the LES coupling is non-zero, so fine-tuning can switch electrostatics on
    model = mace_lr.augment(base, "les").train()
    from mace_lr._data import atoms_to_batch

    batch = atoms_to_batch([systems["open"]], model.atomic_numbers, model.r_max)
    out = model(batch, training=True)
    loss = (out["energy"] - 1.0).pow(2).sum() + out["forces"].pow(2).sum()
    loss.backward()
    assert abs(float(model.blocks["les"].coupling.grad)) > 1e-6


def test_born_charges_acoustic_sum_rule(base, systems):
    model = T.perturb_blocks(mace_lr.augment(base, "les"))
    out = T.evaluate(model, [systems["open"]], compute_born_charges=True, compute_polarizability=True)
    z = out["born_effective_charges"]
    q_total = float(out["charges"].sum())
    assert torch.allclose(z.sum(0), q_total * torch.eye(3, dtype=z.dtype), atol=1e-8)
    # Z differs from q_i I because the charges respond to displacements
    diag = torch.stack([z[i].diagonal() for i in range(len(z))])
    assert float((diag - out["charges"][:, None]).abs().max()) > 1e-4
    assert torch.allclose(
        out["dipole"][0],
        (out["charges"][:, None] * torch.tensor(systems["open"].positions)).sum(0),
        atol=1e-10,
    )
    assert float(out["polarizability"].abs().max()) == 0.0  # linear response block


def test_augment_errors_and_multiple_blocks(base):
    with pytest.raises(KeyError, match="unknown_block"):
        mace_lr.augment(base, "unknown_block")
    model = mace_lr.augment(base, "les")
    with pytest.raises(ValueError, match="already has a block named 'les'"):
        mace_lr.augment(model, "les")
    both = mace_lr.augment(model, {"fixture_constant": {}})
    assert list(both.blocks) == ["les", "fixture_constant"]
    assert both.base is base
    with pytest.raises(TypeError, match="unknown LES option"):
        mace_lr.augment(base, "les", smear=1.0)


def test_save_load_roundtrip_and_safety(base, systems, tmp_path):
    model = T.perturb_blocks(mace_lr.augment(base, "les", smearing=0.9))
    path = tmp_path / "m.model"
    mace_lr.save(model, path)
    loaded = mace_lr.load(path)
    assert loaded.blocks["les"].smearing == 0.9
    a = T.evaluate(model, [systems["periodic"]], compute_stress=True)
    b = T.evaluate(loaded, [systems["periodic"]], compute_stress=True)
    for key in ("energy", "forces", "stress", "charges"):
        assert torch.equal(a[key], b[key]), key
    # a pickled module is refused unless the user opts in
    pickled = tmp_path / "pickled.model"
    torch.save(model, pickled)
    with pytest.raises(ValueError, match="allow_pickle=True"):
        mace_lr.load(pickled)
    assert isinstance(mace_lr.load(pickled, allow_pickle=True), mace_lr.LongRangeMACE)
    with pytest.raises(FileNotFoundError, match="no model file"):
        mace_lr.load(tmp_path / "missing.model")


def test_load_names_missing_block_distribution(base, tmp_path, monkeypatch):
    model = mace_lr.augment(base, "fixture_constant")
    path = tmp_path / "m.model"
    mace_lr.save(model, path)
    from mace_lr import registry

    real = registry._iter_entry_points
    monkeypatch.setattr(
        registry, "_iter_entry_points", lambda: [ep for ep in real() if ep.name != "fixture_constant"]
    )
    registry._LOADED.clear() if hasattr(registry, "_LOADED") else None
    with pytest.raises(
        MissingBlockError, match=r"needs block 'fixture_constant' from mace-lr-fixture-plugin==0\.0\.1"
    ):
        mace_lr.load(path)
