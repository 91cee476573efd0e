"""The `wannier` block: ions plus learned electron centroids, their energy, dipole and Born charges."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms

from mace_lr import augment
from mace_lr.electrostatics import coulomb_energy
from mace_lr.testing import evaluate, make_test_model, perturb_blocks, reference_systems, run_block_contract

#: NaCl test systems: Na is a +1 ion, Cl a +7 ion with an 8-electron centroid (net -1)
CONFIG = {"centroid_electrons": {"Cl": 8}}
FIELD = np.array([0.11, -0.06, 0.17])  # V/Å


@pytest.fixture(scope="module")
def base():
    return make_test_model()


@pytest.fixture(scope="module")
def trained(base):
    # coupling 1: the plain Coulomb energy of ions and centroids (perturb adds 0.3)
    return perturb_blocks(augment(base, {"wannier": dict(CONFIG, coupling_init=0.7)}), scale=0.3)


def _with(atoms, **info):
    a = atoms.copy()
    a.info.update(info)
    return a


def test_wannier_block_contract():
    run_block_contract("wannier", config=CONFIG)


def test_centroids_start_on_their_atoms_and_move_when_trained(base, trained):
    atoms = reference_systems()["open"]
    fresh = evaluate(augment(base, {"wannier": CONFIG}), [atoms])
    mask = fresh["wannier_centroid_mask"]
    assert mask.tolist() == [z == 17 for z in atoms.numbers]
    assert torch.equal(fresh["wannier_centroids"], torch.tensor(atoms.positions))
    out = evaluate(trained, [atoms])
    d = (out["wannier_centroids"] - torch.tensor(atoms.positions)).norm(dim=-1)
    assert float(d[mask].min()) > 1e-3 and float(d[~mask].max()) == 0.0


def test_energy_is_coulomb_energy_of_ions_and_centroids(trained):
    """With γ = 1 the block energy is the Gaussian Coulomb energy of ions (+1, +7) and
    centroids (-8), for molecules and periodic cells alike."""
    block = trained.blocks["wannier"]
    with torch.no_grad():
        block.coupling.fill_(1.0)
    for key in ("open", "periodic"):
        atoms = reference_systems()[key]
        out = evaluate(trained, [atoms])
        mask = out["wannier_centroid_mask"]
        sites = torch.cat([torch.tensor(atoms.positions), out["wannier_centroids"][mask]])
        ions = torch.tensor([1.0 if z == 11 else 7.0 for z in atoms.numbers], dtype=torch.float64)
        charges = torch.cat([ions, torch.full((int(mask.sum()),), -8.0, dtype=torch.float64)])
        cell = torch.tensor(atoms.cell[:]) if atoms.pbc.all() else None
        ref = coulomb_energy(sites, charges, cell, bool(atoms.pbc.all()), smearing=1.0, accuracy=1e-8)
        assert abs(float(out["wannier_energy"][0]) - float(ref)) < 1e-3 * abs(float(ref)), (key, out, ref)


@pytest.mark.parametrize("key", ["open", "periodic"])
def test_dipole_is_field_derivative_and_ion_centroid_sum(trained, key):
    atoms = _with(reference_systems()[key], external_field=FIELD)
    out = evaluate(trained, [atoms], compute_dipole=True)
    mask = out["wannier_centroid_mask"]
    r = torch.tensor(atoms.positions)
    ions = torch.tensor([1.0 if z == 11 else 7.0 for z in atoms.numbers], dtype=torch.float64)
    mu = (ions[:, None] * r).sum(0) - 8.0 * out["wannier_centroids"][mask].sum(0)
    assert torch.allclose(out["dipole"][0], mu, atol=1e-10), (out["dipole"], mu)
    assert torch.allclose(out["wannier_dipole"][0], mu, atol=1e-10)
    assert torch.allclose(out["charges"], torch.where(mask, -1.0, 1.0).double())


def test_born_charges_sum_rule_for_neutral_and_charged_clusters(trained):
    cluster = reference_systems()["open"]
    charged = cluster[[i for i in range(len(cluster)) if i != 0]]  # one Na removed: -1 e
    assert cluster.numbers[0] == 11
    for atoms, q in ((cluster, 0.0), (charged, -1.0)):
        atoms = _with(atoms, external_field=FIELD, charge=q)
        z = evaluate(trained, [atoms], compute_born_charges=True)["born_effective_charges"]
        assert torch.allclose(z.sum(0), q * torch.eye(3, dtype=z.dtype), atol=1e-10), z.sum(0)
        # and the centroids move with the atoms: Z differs from the formal charges
        formal = torch.tensor([1.0 if n == 11 else -1.0 for n in atoms.numbers], dtype=z.dtype)
        assert float((z - formal[:, None, None] * torch.eye(3, dtype=z.dtype)).abs().max()) > 1e-3


def test_forces_in_a_field_are_conservative(trained):
    from mace_lr.testing import (
        assert_born_charges_match_finite_differences,
        assert_forces_match_finite_differences,
    )

    atoms = _with(reference_systems()["open"], external_field=FIELD)
    assert_forces_match_finite_differences(trained, atoms)
    assert_born_charges_match_finite_differences(trained, reference_systems()["open"])


def test_centroids_rotate_translate_and_permute_with_the_atoms(trained):
    atoms = reference_systems()["open"]
    out = evaluate(trained, [atoms])["wannier_centroids"].numpy()
    q, _ = np.linalg.qr(np.random.default_rng(3).normal(size=(3, 3)))
    moved = atoms.copy()
    moved.positions = atoms.positions @ q.T + np.array([0.4, -1.3, 2.2])
    got = evaluate(trained, [moved])["wannier_centroids"].numpy()
    assert np.abs(got - (out @ q.T + np.array([0.4, -1.3, 2.2]))).max() < 1e-9
    perm = np.random.default_rng(4).permutation(len(atoms))
    got = evaluate(trained, [atoms[perm]])["wannier_centroids"].numpy()
    assert np.abs(got - out[perm]).max() < 1e-9


def test_total_charge_must_match_ions_and_centroids(trained):
    cluster = reference_systems()["open"]
    charged = cluster[1:]  # Na removed: ions and centroids add up to -1 e
    with pytest.raises(ValueError, match=r"add up to -1 e but its total charge is 0 e"):
        evaluate(trained, [charged])
    evaluate(trained, [_with(charged, charge=-1)])  # consistent: fine


def test_configuration_errors(base):
    with pytest.raises(ValueError, match="needs `centroid_electrons`"):
        augment(base, "wannier")
    with pytest.raises(ValueError, match="names element.* O the base model does not know"):
        augment(base, {"wannier": {"centroid_electrons": {"O": 8}}})
    with pytest.raises(ValueError, match="unknown element 'Xx'"):
        augment(base, {"wannier": {"centroid_electrons": {"Xx": 8}}})
    with pytest.raises(TypeError, match="unknown wannier option"):
        augment(base, {"wannier": dict(CONFIG, width=1.0)})
    gold = make_test_model(atomic_numbers=(79, 17))
    with pytest.raises(ValueError, match="no default ion charge for Au"):
        augment(gold, {"wannier": CONFIG})
    model = augment(gold, {"wannier": dict(CONFIG, ion_charges={"Au": 1})})
    assert model.blocks["wannier"].to_config()["ion_charges"] == {"Au": 1.0, "Cl": 7.0}


def test_water_like_molecule_dipole_from_formal_charges_at_init():
    """A fresh block puts the centroid on its oxygen: μ = Σ (Z - n) R with O -2, H +1."""
    base = make_test_model(atomic_numbers=(1, 8), r_max=3.0)
    model = augment(base, {"wannier": {"centroid_electrons": {"O": 8}}})
    water = Atoms("OH2", positions=[[0.0, 0.0, 0.0], [0.757, 0.586, 0.0], [-0.757, 0.586, 0.0]])
    out = evaluate(model, [water], compute_dipole=True)
    assert torch.allclose(out["dipole"][0], torch.tensor([0.0, 2 * 0.586, 0.0], dtype=torch.float64))
    assert float(out["lr_energy"][0]) == 0.0


def test_calculator_reports_centroids_after_save_and_load(trained, tmp_path):
    import mace_lr

    path = tmp_path / "w.model"
    mace_lr.save(trained, path)
    calc = mace_lr.MACELRCalculator(model_paths=str(path), device="cpu")
    atoms = reference_systems()["periodic"].copy()
    atoms.calc = calc
    atoms.get_potential_energy()
    centroids = calc.results["wannier_centroids"]
    cl = atoms.numbers == 17
    assert np.isnan(centroids[~cl]).all() and np.isfinite(centroids[cl]).all()
    ref = evaluate(trained, [atoms])["wannier_centroids"].numpy()
    assert np.abs(centroids[cl] - ref[cl]).max() < 1e-12
    assert np.allclose(atoms.get_charges(), np.where(cl, -1.0, 1.0))
