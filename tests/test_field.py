"""The `field` block: U(R, E) with the field as an l = 1 input, and its responses."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mace_lr import augment
from mace_lr.testing import (
    assert_forces_match_finite_differences,
    assert_stress_matches_finite_differences,
    evaluate,
    make_test_model,
    perturb_blocks,
    reference_systems,
    run_block_contract,
)

FIELD = np.array([0.12, -0.07, 0.2])  # V/Å


@pytest.fixture(scope="module")
def base():
    return make_test_model()


@pytest.fixture(scope="module")
def trained(base):
    return perturb_blocks(augment(base, "field"), scale=0.3)


def _with_field(atoms, field):
    a = atoms.copy()
    a.info["external_field"] = np.asarray(field, dtype=float)
    return a


def _energy(model, atoms) -> float:
    return float(evaluate(model, [atoms], compute_force=False)["energy"][0])


def _response(model, atoms, **kw):
    return evaluate(
        model, [atoms], compute_dipole=True, compute_born_charges=True, compute_polarizability=True, **kw
    )


def test_field_block_contract():
    run_block_contract("field")


def test_field_block_contract_on_a_base_without_vector_features():
    # no 1o channels to mix: the block must not carry parameters that never train
    run_block_contract("field", base=make_test_model(hidden_irreps="8x0e"))


@pytest.mark.parametrize("kind", ["periodic", "open", "slab"])
def test_identity_at_init_at_finite_field(base, kind):
    model = augment(base, "field")
    atoms = _with_field(reference_systems()[kind], FIELD)
    ref = evaluate(base, [atoms], compute_stress=True)
    got = _response(model, atoms, compute_stress=True)
    for key in ("energy", "forces", "stress"):
        assert float((ref[key] - got[key]).abs().max()) < 1e-10, key
    for key in ("dipole", "born_effective_charges", "polarizability"):
        assert float(got[key].abs().max()) == 0.0, key


def test_block_energy_vanishes_at_zero_field_for_any_geometry(base, trained):
    for atoms in reference_systems().values():
        assert abs(_energy(trained, atoms) - _energy(base, atoms)) < 1e-10
    # ... and not at a finite field
    atoms = _with_field(reference_systems()["open"], FIELD)
    assert abs(_energy(trained, atoms) - _energy(base, atoms)) > 1e-3


@pytest.mark.parametrize("kind", ["open", "periodic"])
def test_dipole_born_charges_polarizability_match_finite_differences(trained, kind):
    atoms = _with_field(reference_systems()[kind], FIELD)
    out = _response(trained, atoms)
    mu, bec, alpha = (out[k].numpy() for k in ("dipole", "born_effective_charges", "polarizability"))
    mu = mu[0]
    alpha = alpha[0]
    h = 1e-4
    for a in range(3):
        step = np.zeros(3)
        step[a] = h
        plus, minus = _with_field(atoms, FIELD + step), _with_field(atoms, FIELD - step)
        # μ = −∂U/∂E
        fd_mu = -(_energy(trained, plus) - _energy(trained, minus)) / (2 * h)
        assert abs(fd_mu - mu[a]) < 1e-7 * max(1.0, abs(mu[a])), (a, fd_mu, mu[a])
        # Z[i, a, :] = ∂F_i/∂E_a ; α[:, a] = ∂μ/∂E_a
        op, om = _response(trained, plus), _response(trained, minus)
        fd_z = (op["forces"].numpy() - om["forces"].numpy()) / (2 * h)
        assert np.abs(fd_z - bec[:, a, :]).max() < 1e-6
        fd_alpha = (op["dipole"].numpy()[0] - om["dipole"].numpy()[0]) / (2 * h)
        assert np.abs(fd_alpha - alpha[:, a]).max() < 1e-6
    assert np.abs(alpha - alpha.T).max() < 1e-10
    assert np.abs(alpha).max() > 1e-3  # the test tests something
    # translation invariance of U at every field: the acoustic sum rule for a neutral block
    assert np.abs(bec.sum(0)).max() < 1e-6
    assert np.abs(bec).max() > 1e-3


def test_closed_form_block_dipole_equals_autograd_dipole(trained):
    atoms = _with_field(reference_systems()["open"], FIELD)
    auto = evaluate(trained, [atoms], compute_dipole=True)["dipole"][0]
    closed = evaluate(trained, [atoms])["field_dipole"][0]
    assert torch.allclose(auto, closed, atol=1e-12, rtol=0)
    atomic = evaluate(trained, [atoms])["field_atomic_dipoles"]
    assert torch.allclose(atomic.sum(0), closed, atol=1e-12, rtol=0)


def test_response_is_nonlinear_in_the_field(trained):
    atoms = reference_systems()["open"]
    a0 = _response(trained, _with_field(atoms, np.zeros(3)))["polarizability"][0]
    a1 = _response(trained, _with_field(atoms, 2 * FIELD))["polarizability"][0]
    assert float((a1 - a0).abs().max()) > 1e-4  # order 3: α depends on E


def test_rotating_structure_and_field_rotates_the_responses(trained):
    from scipy.spatial.transform import Rotation

    atoms = _with_field(reference_systems()["open"], FIELD)
    rot = Rotation.from_euler("xyz", [0.3, -1.1, 2.0]).as_matrix()
    turned = atoms.copy()
    turned.positions = atoms.positions @ rot.T
    turned.info["external_field"] = rot @ FIELD
    o, t = _response(trained, atoms), _response(trained, turned)
    assert abs(float(o["energy"][0] - t["energy"][0])) < 1e-9
    assert np.abs(rot @ o["dipole"].numpy()[0] - t["dipole"].numpy()[0]).max() < 1e-9
    assert np.abs(rot @ o["polarizability"].numpy()[0] @ rot.T - t["polarizability"].numpy()[0]).max() < 1e-9
    zo = np.einsum("ab,iby,xy->iax", rot, o["born_effective_charges"].numpy(), rot)
    assert np.abs(zo - t["born_effective_charges"].numpy()).max() < 1e-9
    # a field that is not rotated with the structure is seen
    wrong = turned.copy()
    wrong.info["external_field"] = FIELD
    assert abs(float(o["energy"][0]) - _energy(trained, wrong)) > 1e-4


@pytest.mark.parametrize("kind", ["periodic", "slab"])
def test_forces_and_stress_at_finite_field_match_finite_differences(trained, kind):
    atoms = _with_field(reference_systems()[kind], FIELD)
    assert_forces_match_finite_differences(trained, atoms)
    assert_stress_matches_finite_differences(trained, atoms)


def test_work_around_a_closed_field_loop_vanishes(trained):
    """∮ μ·dE = 0 (spectrally accurate trapezoid rule on a closed loop) and ∫ μ·dE = U(0) − U(E)."""
    atoms = reference_systems()["open"]
    n = 48
    t = np.linspace(0.0, 2 * np.pi, n, endpoint=False)
    centre, e1, e2 = np.array([0.05, 0.0, -0.1]), np.array([0.2, 0.1, 0.0]), np.array([0.0, 0.15, 0.25])
    path = centre + np.cos(t)[:, None] * e1 + np.sin(t)[:, None] * e2
    tangent = -np.sin(t)[:, None] * e1 + np.cos(t)[:, None] * e2
    mus = np.array(
        [evaluate(trained, [_with_field(atoms, e)], compute_dipole=True)["dipole"].numpy()[0] for e in path]
    )
    loop = float(np.sum(np.einsum("ta,ta->t", mus, tangent)) * 2 * np.pi / n)
    scale = float(np.sum(np.abs(np.einsum("ta,ta->t", mus, tangent))) * 2 * np.pi / n)
    assert scale > 1e-2
    assert abs(loop) < 1e-10 * scale + 1e-12
    # a straight path from 0 to E (Gauss–Legendre): the work equals the energy change
    nodes, weights = np.polynomial.legendre.leggauss(8)
    s = 0.5 * (nodes + 1.0)
    work = sum(
        0.5
        * w
        * evaluate(trained, [_with_field(atoms, si * FIELD)], compute_dipole=True)["dipole"].numpy()[0]
        @ FIELD
        for si, w in zip(s, weights)
    )
    du = _energy(trained, _with_field(atoms, np.zeros(3))) - _energy(trained, _with_field(atoms, FIELD))
    assert abs(work - du) < 1e-10


def test_charged_system_sum_rule_with_qeq_and_field(base):
    from ase import Atoms

    model = perturb_blocks(augment(base, {"qeq": {}, "field": {}}), scale=0.3)
    atoms = reference_systems()["open"]
    atoms = Atoms(numbers=atoms.numbers, positions=atoms.positions)
    atoms.info["charge"] = 1.0
    atoms.info["external_field"] = FIELD
    bec = evaluate(model, [atoms], compute_born_charges=True)["born_effective_charges"].numpy()
    # QEq's field coupling is scaled by its γ (its dipole is γ Σ q* r), so its Born
    # charges sum to γ Q I; the field block adds exactly zero to the sum
    gamma = float(model.blocks["qeq"].gamma().detach())
    assert 0.1 < gamma < 1.0
    assert np.abs(bec.sum(0) - gamma * 1.0 * np.eye(3)).max() < 1e-6
    assert np.abs(bec).max() > 1e-2


def test_p_e_loop_closes_through_the_calculator(trained, tmp_path):
    from mace_lr import MACELRCalculator

    atoms = reference_systems()["open"].copy()
    calc = MACELRCalculator(trained, default_dtype="float64")
    atoms.calc = calc
    ramp = np.concatenate([np.linspace(0, 1, 6), np.linspace(1, -1, 11)[1:], np.linspace(-1, 0, 6)[1:]])
    dipoles = []
    for s in ramp:
        atoms.info["external_field"] = s * FIELD
        dipoles.append(atoms.get_dipole_moment().copy())
    dipoles = np.array(dipoles)
    assert np.abs(dipoles[0] - dipoles[-1]).max() < 1e-12
    # the same field gives the same dipole on the way up and on the way down
    down = 6 + int(np.argmin(np.abs(ramp[6:11] - ramp[3])))
    assert np.isclose(ramp[3], ramp[down]) and down != 3
    assert np.abs(dipoles[3] - dipoles[down]).max() < 1e-12
    assert np.abs(dipoles[5] - dipoles[0]).max() > 1e-3


def test_bad_options_are_rejected(base):
    with pytest.raises(ValueError, match="order"):
        augment(base, "field", order=0)
    with pytest.raises(TypeError, match="unknown field-block option"):
        augment(base, "field", polarisability=1)
