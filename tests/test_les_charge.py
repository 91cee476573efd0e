"""LES with ``total_charge``: charges that add up to each structure's total charge."""

import logging

import ase.io
import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import molecule
from mace_lr.plugins.les import LESBlock

import mace_lr
from mace_lr import testing as T

Z_HCNO = (1, 6, 7, 8)


@pytest.fixture(scope="module")
def base():
    return T.make_test_model(atomic_numbers=Z_HCNO, r_max=4.0, seed=3)


def _place(atoms, shift, charge):
    atoms = atoms.copy()
    atoms.positions += np.asarray(shift, float)
    atoms.info["charge"] = charge
    return atoms


def _molecules():
    """Charged and neutral small molecules (the charges are labels: the model is random)."""
    rng = np.random.default_rng(4)
    water = molecule("H2O")
    ammonium = Atoms(
        "NH4", positions=[[0, 0, 0], [0.6, 0.6, 0.6], [0.6, -0.6, -0.6], [-0.6, 0.6, -0.6], [-0.6, -0.6, 0.6]]
    )
    formate = Atoms("CHOO", positions=[[0, 0, 0], [0, 0, 1.10], [1.13, 0, -0.63], [-1.13, 0, -0.63]])
    methanol = molecule("CH3OH")
    out = [_place(water, (0, 0, 0), 0), _place(ammonium, (0, 0, 0), 1), _place(formate, (0, 0, 0), -1)]
    out.append(_place(methanol, (0, 0, 0), 0))
    pair = _place(ammonium, (0, 0, 0), 0) + _place(formate, (0, 0, 9.0), 0)  # ion pair, neutral
    pair.info["charge"] = 0
    out.append(pair)
    like = _place(ammonium, (0, 0, 0), 0) + _place(ammonium, (0, 0, 12.0), 0)  # like-charged pair
    like.info["charge"] = 2
    out.append(like)
    for atoms in out:
        atoms.positions += rng.normal(scale=0.03, size=atoms.positions.shape)
    return out


def _model(base, mode, **options):
    return T.perturb_blocks(mace_lr.augment(base, "les", total_charge=mode, **options), scale=0.5)


def _graph_sums(charges, systems):
    bounds = np.cumsum([0] + [len(a) for a in systems])
    q = charges.cpu().numpy()
    return np.array([q[bounds[g] : bounds[g + 1]].sum() for g in range(len(systems))])


@pytest.mark.parametrize("mode", ["uniform", "learned"])
def test_charges_sum_to_total_charge_in_a_mixed_batch(base, mode):
    systems = _molecules()
    totals = np.array([a.info["charge"] for a in systems], float)
    model = _model(base, mode)
    out = T.evaluate(model, systems)
    np.testing.assert_allclose(_graph_sums(out["charges"], systems), totals, rtol=0, atol=1e-10)
    # the plain block's charges do not (so the test can fail)
    plain = T.evaluate(T.perturb_blocks(mace_lr.augment(base, "les"), scale=0.5), systems)
    assert np.abs(_graph_sums(plain["charges"], systems) - totals).max() > 1e-2
    # a batch gives each structure what it gets alone
    single = T.evaluate(model, [systems[-1]])
    n = len(systems[-1])
    np.testing.assert_allclose(out["charges"][-n:].numpy(), single["charges"].numpy(), atol=1e-12)
    assert abs(float(out["energy"][-1] - single["energy"][0])) < 1e-10


def test_uniform_correction_is_the_exact_shift_of_the_latent_charges(base):
    """q_i = q̃_i + (Q − Σ q̃)/N with the plain block's q̃ (same weights)."""
    model = _model(base, "uniform")
    plain = mace_lr.augment(base, "les")
    plain.blocks["les"].load_state_dict(model.blocks["les"].state_dict())
    systems = _molecules()
    q = T.evaluate(model, systems)["charges"].numpy()
    gamma = float(plain.blocks["les"].gamma().detach())
    q_latent = T.evaluate(plain, systems)["charges"].numpy() / np.sqrt(gamma)
    start = 0
    for atoms in systems:
        sl = slice(start, start + len(atoms))
        expect = q_latent[sl] + (atoms.info["charge"] - q_latent[sl].sum()) / len(atoms)
        np.testing.assert_allclose(q[sl], expect, atol=1e-12)
        start += len(atoms)


def test_learned_weights_start_uniform_and_move_the_excess(base):
    """At init the learned weights are uniform; once trained they redistribute differently."""
    fresh = mace_lr.augment(base, "les", total_charge="learned", coupling_init=0.5)
    uniform = mace_lr.augment(base, "les", total_charge="uniform", coupling_init=0.5)
    uniform.blocks["les"].readout.load_state_dict(fresh.blocks["les"].readout.state_dict())
    systems = _molecules()
    a, b = T.evaluate(fresh, systems)["charges"], T.evaluate(uniform, systems)["charges"]
    assert float((a - b).abs().max()) < 1e-12
    moved = _model(base, "learned")
    same = mace_lr.augment(base, "les", total_charge="uniform")
    same.blocks["les"].readout.load_state_dict(moved.blocks["les"].readout.state_dict())
    c, d = T.evaluate(moved, systems)["charges"], T.evaluate(same, systems)["charges"]
    assert float((c - d).abs().max()) > 1e-3


@pytest.mark.parametrize("mode", ["uniform", "learned"])
def test_identity_at_init_for_charged_molecules_in_a_field(base, mode):
    model = mace_lr.augment(base, "les", total_charge=mode)
    systems = _molecules()
    T.assert_identity_at_init(base, model, systems[:3] + systems[-1:])
    field = systems[1].copy()
    field.info["external_field"] = np.array([0.1, -0.05, 0.2])
    ref, got = T.evaluate(base, [field]), T.evaluate(model, [field])
    assert float((ref["energy"] - got["energy"]).abs().max()) < 1e-10
    assert float((ref["forces"] - got["forces"]).abs().max()) < 1e-10
    assert abs(float(got["charges"].sum()) - 1.0) < 1e-10  # the charges are live at init
    # the coupling gets a gradient at init (no saddle point)
    from mace_lr._data import atoms_to_batch

    batch = atoms_to_batch(systems[-1:], model.atomic_numbers, float(model.r_max), heads=model.heads)
    out = model(batch, training=True)
    (grad,) = torch.autograd.grad(out["energy"].sum(), model.blocks["les"].coupling)
    assert abs(float(grad)) > 1e-4


@pytest.mark.parametrize("mode", ["uniform", "learned"])
def test_forces_and_invariances_of_charged_structures(base, mode):
    model = _model(base, mode)
    systems = _molecules()
    for atoms in (systems[2], systems[-1]):
        T.assert_forces_match_finite_differences(model, atoms, max_components=8)
        T.assert_invariances(model, atoms)
    # charges are invariant under rotation and follow a permutation
    atoms = systems[-1]
    q0 = T.evaluate(model, [atoms])["charges"].numpy()
    perm = np.random.default_rng(1).permutation(len(atoms))
    np.testing.assert_allclose(T.evaluate(model, [atoms[perm]])["charges"].numpy(), q0[perm], atol=1e-10)
    rot = np.linalg.qr(np.random.default_rng(2).normal(size=(3, 3)))[0]
    turned = atoms.copy()
    turned.positions = atoms.positions @ rot.T
    np.testing.assert_allclose(T.evaluate(model, [turned])["charges"].numpy(), q0, atol=1e-10)


def test_block_contract_learned():
    T.run_block_contract("les", config={"smearing": 1.2, "total_charge": "learned"})


def test_default_is_unchanged_and_options_round_trip(base):
    plain = mace_lr.augment(base, "les")
    block = plain.blocks["les"]
    assert "total_charge" not in block.to_config()
    assert plain.required_inputs == []
    assert not any("weight_readout" in k for k in block.state_dict())
    model = mace_lr.augment(base, "les", total_charge="learned")
    assert model.blocks["les"].to_config()["total_charge"] == "learned"
    assert model.required_inputs == ["total_charge"]
    rebuilt = LESBlock.from_config(model.blocks["les"].to_config())
    assert set(rebuilt.state_dict()) == set(model.blocks["les"].state_dict())
    with pytest.raises(ValueError, match="LES `total_charge` must be one of 'none', 'uniform', 'learned'"):
        mace_lr.augment(base, "les", total_charge="fixed")


def test_missing_total_charge_is_an_error(base):
    atoms = _molecules()[1]
    del atoms.info["charge"]
    atoms.calc = mace_lr.MACELRCalculator(model_paths=_model(base, "uniform"), device="cpu")
    with pytest.raises(KeyError, match=r"no atoms.info\['charge'\] \(total_charge\)"):
        atoms.get_potential_energy()
    # the plain block does not need it
    atoms.calc = mace_lr.MACELRCalculator(model_paths=mace_lr.augment(base, "les"), device="cpu")
    assert np.isfinite(atoms.get_potential_energy())


@pytest.fixture
def _restore_root_logger():
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)


@pytest.mark.parametrize(
    "config, missing",
    [
        ('{"total_charge": "uniform"}', "total_charge"),
        ('{"total_charge": "learned", "charge_groups": "fragments"}', "formal_charges"),
    ],
)
def test_training_without_total_charge_fails_at_start(
    base, tmp_path, capsys, _restore_root_logger, config, missing
):
    """Per structure the total charge is required; per fragment the per-atom formal charges."""
    from mace_lr.cli import run_train as cli

    frames = _molecules()[:4]
    for atoms in frames:
        if missing == "total_charge":
            atoms.info.pop("charge")
        atoms.info["REF_energy"] = 0.0
        atoms.arrays["REF_forces"] = np.zeros((len(atoms), 3))
    ase.io.write(tmp_path / "train.xyz", frames, format="extxyz")
    torch.save(base, tmp_path / "found.model")
    argv = [
        "--name", "x", "--foundation_model", str(tmp_path / "found.model"),
        "--lr_blocks", "les", "--lr_config", config,
        "--train_file", str(tmp_path / "train.xyz"), "--valid_fraction", "0.25",
        "--energy_key", "REF_energy", "--forces_key", "REF_forces", "--max_num_epochs", "1",
        "--device", "cpu", "--default_dtype", "float64", "--model_dir", str(tmp_path),
        "--checkpoints_dir", str(tmp_path / "ckpt"), "--log_dir", str(tmp_path / "logs"),
        "--results_dir", str(tmp_path / "results"),
    ]  # fmt: skip
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert f"lack the key '{missing}'" in capsys.readouterr().err
