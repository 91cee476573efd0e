"""Tests of mace_lr.MACELRCalculator (ASE interface) on a small perturbed LES model."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from ase import Atoms, units
from ase.calculators.calculator import Calculator
from ase.md.verlet import VelocityVerlet
from ase.stress import full_3x3_to_voigt_6_stress

import mace_lr
from mace_lr.testing import (
    assert_born_charges_match_finite_differences,
    evaluate,
    make_test_model,
    perturb_blocks,
    reference_systems,
)

# Building e3nn modules (make_test_model, mace_lr.load) runs torch.jit.script, whose
# "instance-level annotations" UserWarning is attributed to the stdlib `ast` module and
# so escapes the torch.* filters of pyproject.toml; with warnings as errors it would
# fail every test.
EXPECTED_PROPERTIES = (
    "energy",
    "forces",
    "stress",
    "charges",
    "dipole",
    "born_effective_charges",
    "polarizability",
    "lr_energy",
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # 8-atom structures: one thread is faster than two, and much faster when another
    # process competes for the two cores.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def base():
    return make_test_model()


@pytest.fixture(scope="module")
def model(base):
    """LES model with non-zero coupling and charges (γ = 0.3)."""
    return perturb_blocks(mace_lr.augment(base, "les", smearing=1.0))


@pytest.fixture(scope="module")
def model_path(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("calculator") / "les.model"
    mace_lr.save(model, path)
    return str(path)


@pytest.fixture(scope="module")
def calc(model_path):
    return mace_lr.MACELRCalculator(model_paths=model_path, device="cpu", default_dtype="float64")


@pytest.fixture(scope="module")
def systems():
    return reference_systems()


def _fresh(systems, key: str, calc) -> Atoms:
    atoms = systems[key].copy()
    atoms.calc = calc
    return atoms


# ----------------------------------------------------------------------------------------
# implemented_properties
# ----------------------------------------------------------------------------------------


def test_implemented_properties_is_own_list(calc):
    other = mace_lr.MACELRCalculator(model_paths=copy.deepcopy(calc.model))
    class_list = list(Calculator.implemented_properties)
    for prop in EXPECTED_PROPERTIES:
        assert prop in calc.implemented_properties
    assert calc.implemented_properties is not Calculator.implemented_properties
    assert calc.implemented_properties is not other.implemented_properties
    calc.implemented_properties.append("made_up_property")
    try:
        assert Calculator.implemented_properties == class_list
        assert "made_up_property" not in other.implemented_properties
        assert "made_up_property" not in type(calc).implemented_properties
    finally:
        calc.implemented_properties.remove("made_up_property")


# ----------------------------------------------------------------------------------------
# agreement with the model
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["periodic", "open"])
def test_results_equal_direct_model_evaluation(model, calc, systems, key):
    atoms = _fresh(systems, key, calc)
    energy = atoms.get_potential_energy()
    forces = atoms.get_forces()
    # `model` is the in-memory original: this also checks the save/load round trip
    ref = evaluate(model, [systems[key]], compute_stress=True, compute_dipole=True)
    assert energy == pytest.approx(float(ref["energy"][0]), rel=0, abs=1e-10)
    np.testing.assert_allclose(forces, ref["forces"].numpy(), rtol=0, atol=1e-10)
    np.testing.assert_allclose(calc.results["charges"], ref["charges"].numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(calc.results["dipole"], ref["dipole"][0].numpy(), rtol=0, atol=1e-10)
    assert float(np.abs(calc.results["charges"]).max()) > 1e-3, "perturbed LES model has zero charges"
    if key == "periodic":
        stress = atoms.get_stress()
        assert stress.shape == (6,)
        expected = full_3x3_to_voigt_6_stress(ref["stress"][0].numpy())
        np.testing.assert_allclose(stress, expected, rtol=0, atol=1e-10)
        assert float(np.abs(stress).max()) > 0
        np.testing.assert_allclose(
            calc.results["polarization"], calc.results["dipole"] / atoms.get_volume(), rtol=1e-12
        )


@pytest.mark.parametrize("key", ["periodic", "open"])
def test_charges_and_lr_energy(base, calc, systems, key):
    atoms = _fresh(systems, key, calc)
    charges = atoms.get_charges()
    assert charges.shape == (len(atoms),)
    np.testing.assert_array_equal(charges, calc.results["charges"])
    energy = atoms.get_potential_energy()
    assert "lr_energy" in calc.results
    base_energy = float(evaluate(base, [systems[key]])["energy"][0])
    assert abs(calc.results["lr_energy"]) > 1e-3, "perturbed LES block contributes nothing"
    assert calc.results["lr_energy"] == pytest.approx(energy - base_energy, rel=0, abs=1e-9)
    # one LES block: its share is the whole long-range energy
    assert calc.results["les_energy"] == pytest.approx(calc.results["lr_energy"], rel=0, abs=1e-12)


# ----------------------------------------------------------------------------------------
# external field
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["open", "periodic"])
def test_changing_field_invalidates_results(calc, systems, key):
    atoms = _fresh(systems, key, calc)
    e0 = atoms.get_potential_energy()
    f0 = atoms.get_forces().copy()
    dipole0 = calc.results["dipole"].copy()
    bec = calc.get_property("born_effective_charges", atoms).copy()

    field = np.array([1.0e-3, -0.7e-3, 0.4e-3])  # V/Å
    atoms.info["external_field"] = field.copy()  # nothing else changes
    e1 = atoms.get_potential_energy()
    f1 = atoms.get_forces().copy()
    assert np.abs(f1 - f0).max() > 1e-6, "forces were not recomputed after the field changed"
    np.testing.assert_allclose(f1 - f0, np.einsum("iab,a->ib", bec, field), rtol=0, atol=1e-6)
    assert e1 - e0 == pytest.approx(-field @ dipole0, rel=1e-6, abs=1e-9)

    # mutating the stored array in place is a change too
    atoms.info["external_field"][0] = -1.0e-3
    f2 = atoms.get_forces()
    expected = np.einsum("iab,a->ib", bec, atoms.info["external_field"])
    np.testing.assert_allclose(f2 - f0, expected, rtol=0, atol=1e-6)

    # removing the field restores the zero-field results
    del atoms.info["external_field"]
    assert atoms.get_potential_energy() == pytest.approx(e0, rel=0, abs=1e-10)
    np.testing.assert_allclose(atoms.get_forces(), f0, rtol=0, atol=1e-10)


def test_constructor_field_applies_to_structures_without_their_own(calc, systems):
    field = [0.0, 2.0e-3, -1.0e-3]
    with_default = mace_lr.MACELRCalculator(model_paths=copy.deepcopy(calc.model), external_field=field)
    a = _fresh(systems, "open", with_default)
    b = _fresh(systems, "open", calc)
    b.info["external_field"] = np.array(field)
    assert a.get_potential_energy() == pytest.approx(b.get_potential_energy(), rel=0, abs=1e-12)
    np.testing.assert_allclose(a.get_forces(), b.get_forces(), rtol=0, atol=1e-12)
    # a structure's own field takes precedence over the calculator's
    a.info["external_field"] = np.zeros(3)
    c = _fresh(systems, "open", calc)
    assert a.get_potential_energy() == pytest.approx(c.get_potential_energy(), rel=0, abs=1e-12)


# ----------------------------------------------------------------------------------------
# Born effective charges
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["open", "periodic"])
def test_born_charges_acoustic_sum_rule(calc, systems, key):
    atoms = _fresh(systems, key, calc)
    bec = calc.get_property("born_effective_charges", atoms)
    assert bec.shape == (len(atoms), 3, 3)
    total_charge = float(calc.results["charges"].sum())
    # LES charges depend on positions only through invariant features, so Σ_j ∂q_i/∂R_j = 0
    # and Σ_i Z_i = ∂μ/∂(rigid translation) = (Σ_i q_i) I
    np.testing.assert_allclose(bec.sum(0), total_charge * np.eye(3), rtol=0, atol=1e-8)
    # Z is not just q_i I: the charges respond to the geometry
    diag = np.einsum("i,ab->iab", calc.results["charges"], np.eye(3))
    assert np.abs(bec - diag).max() > 1e-6


def test_born_charges_match_finite_differences(calc, systems):
    atoms = _fresh(systems, "open", calc)
    bec = calc.get_property("born_effective_charges", atoms).copy()
    h = 1e-3
    for alpha in range(3):
        forces = []
        for sign in (1.0, -1.0):
            field = np.zeros(3)
            field[alpha] = sign * h
            atoms.info["external_field"] = field
            forces.append(atoms.get_forces().copy())
        fd = (forces[0] - forces[1]) / (2 * h)
        np.testing.assert_allclose(fd, bec[:, alpha, :], rtol=0, atol=1e-6)
    # the library's contract helper on the calculator's (reloaded) model
    assert_born_charges_match_finite_differences(calc.model, systems["open"])


def test_polarizability_of_fixed_charge_model_is_zero(calc, systems):
    # LES charges do not depend on the field: the dipole is linear in R and field-free
    atoms = _fresh(systems, "open", calc)
    pol = calc.get_property("polarizability", atoms)
    assert pol.shape == (3, 3)
    np.testing.assert_allclose(pol, 0.0, atol=1e-12)


# ----------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------


def test_bad_external_field_shape(calc, systems):
    atoms = _fresh(systems, "open", calc)
    atoms.info["external_field"] = [1.0e-3, 0.0]
    with pytest.raises(ValueError, match=r"external_field'\] must be a 3-vector in V/Å, got shape \(2,\)"):
        atoms.get_potential_energy()
    with pytest.raises(ValueError, match=r"external_field must be a 3-vector in V/Å, got shape \(2, 2\)"):
        mace_lr.MACELRCalculator(model_paths=copy.deepcopy(calc.model), external_field=np.zeros((2, 2)))


def test_unknown_element(calc, systems):
    atoms = systems["open"].copy()
    atoms.numbers[0] = 8
    atoms.calc = calc
    with pytest.raises(ValueError, match=r"element\(s\) O \(Z=8\) the model does not know; it knows Na, Cl"):
        atoms.get_potential_energy()


def test_bad_dtype_and_missing_file(model_path, tmp_path):
    with pytest.raises(ValueError, match=r"default_dtype must be 'float32' or 'float64', got 'float16'"):
        mace_lr.MACELRCalculator(model_paths=model_path, default_dtype="float16")
    with pytest.raises(FileNotFoundError, match="no model file"):
        mace_lr.MACELRCalculator(model_paths=str(tmp_path / "missing.model"))


# ----------------------------------------------------------------------------------------
# precision and dynamics
# ----------------------------------------------------------------------------------------


def test_float32_agrees_with_float64(calc, model_path, systems):
    calc32 = mace_lr.MACELRCalculator(model_paths=model_path, default_dtype="float32")
    assert next(calc32.model.parameters()).dtype == torch.float32
    for key in ("periodic", "open"):
        e64 = _fresh(systems, key, calc).get_potential_energy()
        f64 = calc.results["forces"].copy()
        e32 = _fresh(systems, key, calc32).get_potential_energy()
        f32 = calc32.results["forces"]
        assert abs(e32 - e64) <= 1e-4 * max(1.0, abs(e64)), f"{key}: {e32} vs {e64}"
        assert np.abs(f32 - f64).max() <= 1e-3 * max(1.0, np.abs(f64).max())


def _thermalize(atoms: Atoms, temperature_k: float, seed: int) -> None:
    from ase.md import velocitydistribution as vd

    rng = np.random.default_rng(seed)
    if hasattr(vd, "thermalize_momenta"):  # ase >= 3.29
        vd.thermalize_momenta(atoms, temperature_k, rng=rng)
    else:  # pragma: no cover - older ase
        vd.MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_k, rng=rng)
    vd.Stationary(atoms)


def test_nve_conserves_energy(calc, systems):
    """VelocityVerlet, 1 fs, 40 steps of a rattled 8-atom NaCl cell at 300 K.

    Threshold 2e-5 eV/atom. Measured: |ΔE| ≈ 1e-7 eV/atom (largest excursion ≈ 2e-7), the
    O((ω dt)²) shadow-Hamiltonian oscillation of Verlet. Scaling the LES part of the forces
    by 0.9 (forces no longer the gradient of the energy) gives 4.6e-4 eV/atom, so the
    threshold catches a ≳0.5 % inconsistency and leaves a 100× margin on the correct run.
    """
    atoms = _fresh(systems, "periodic", calc)
    _thermalize(atoms, 300.0, seed=42)
    dyn = VelocityVerlet(atoms, timestep=1.0 * units.fs)
    totals = []
    dyn.attach(lambda: totals.append(atoms.get_total_energy()), interval=1)
    dyn.run(40)
    totals = np.array(totals)
    assert len(totals) == 41
    assert atoms.get_temperature() > 50.0, "the atoms did not move"
    drift = abs(totals[-1] - totals[0]) / len(atoms)
    excursion = (totals.max() - totals.min()) / len(atoms)
    assert drift < 2e-5, f"NVE energy drift {drift:.3g} eV/atom over 40 fs"
    assert excursion < 2e-5, f"NVE energy excursion {excursion:.3g} eV/atom over 40 fs"
