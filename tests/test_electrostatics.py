import math

import numpy as np
import pytest
import torch
from helpers import MADELUNG, direct_open_energy, madelung_system, random_box

from mace_lr.electrostatics import (
    COULOMB_CONSTANT,
    _engine,
    _kernels,
    coulomb_energy,
    coulomb_potential,
)


@pytest.mark.parametrize("name", sorted(MADELUNG))
@pytest.mark.parametrize("method", ["ewald", "p3m"])
def test_madelung_constants(name, method):
    atoms, q, nn, constant = madelung_system(name)
    energy = coulomb_energy(
        torch.tensor(atoms.positions), q, torch.tensor(atoms.cell[:]), True, accuracy=1e-7, method=method
    )
    madelung = -float(energy) * nn / (COULOMB_CONSTANT * len(atoms) / 2)
    assert abs(madelung - constant) / constant < 1e-6


def test_madelung_left_handed_and_primitive_cells():
    atoms, q, nn, constant = madelung_system("NaCl")
    # primitive (triclinic) fcc cell
    from ase.build import bulk

    prim = bulk("NaCl", "rocksalt", a=5.64)
    qp = torch.tensor([1.0, -1.0], dtype=torch.float64)
    e_prim = coulomb_energy(torch.tensor(prim.positions), qp, torch.tensor(prim.cell[:]), True, accuracy=1e-8)
    assert abs(-float(e_prim) * nn / COULOMB_CONSTANT - constant) / constant < 1e-6
    # left-handed: swap two lattice vectors
    cell = torch.tensor(prim.cell[:])[[1, 0, 2]]
    assert torch.linalg.det(cell) < 0
    e_left = coulomb_energy(torch.tensor(prim.positions), qp, cell, True, accuracy=1e-8)
    assert abs(float(e_left - e_prim)) < 1e-9


def _periodic_with(params, pos, q, cell, sigma):
    phi = _engine._real_space(pos, q[:, None], cell, params, sigma, (True, True, True))
    phi = phi + _engine._reciprocal_space(pos, q[:, None], cell, params, sigma)
    return 0.5 * COULOMB_CONSTANT * float((q[:, None] * phi).sum())


@pytest.mark.parametrize("sigma", [0.0, 0.8])
@pytest.mark.parametrize("neutral", [True, False])
def test_ewald_energy_independent_of_split(sigma, neutral):
    pos, q, cell = random_box(24, seed=3, neutral=neutral, triclinic=True)
    energies = []
    for split in (1.2, 1.8, 2.6):
        eps = 1e-12
        rcut = split * math.sqrt(2 * (math.log(1 / eps) + 1.5)) if split > sigma else 0.0
        kcut = math.sqrt(2 * (math.log(1 / eps) + 1.5)) / split
        params = _kernels.EwaldParameters("ewald", split, rcut, kcut=kcut)
        energies.append(_periodic_with(params, pos, q, cell, sigma))
    assert max(energies) - min(energies) < 1e-8 * max(1.0, abs(energies[0]))


@pytest.mark.parametrize("sigma", [None, 1.0])
@pytest.mark.parametrize("accuracy", [1e-4, 1e-6])
def test_p3m_matches_converged_ewald(sigma, accuracy):
    pos, q, cell = random_box(400, density=0.08, seed=1)
    pos.requires_grad_(True)
    ref_e = coulomb_energy(pos, q, cell, True, smearing=sigma, accuracy=1e-10, method="ewald")
    (ref_f,) = torch.autograd.grad(-ref_e, pos)
    e = coulomb_energy(pos, q, cell, True, smearing=sigma, accuracy=accuracy, method="p3m")
    (f,) = torch.autograd.grad(-e, pos)
    e, ref_e = e.detach(), ref_e.detach()
    rel_e = abs(float(e - ref_e)) / abs(float(ref_e))
    rel_f = float(torch.linalg.norm(f - ref_f) / torch.linalg.norm(ref_f))
    assert rel_e < accuracy and rel_f < accuracy, (rel_e, rel_f)


@pytest.mark.parametrize("accuracy", [1e-4, 1e-6])
def test_auto_ewald_meets_accuracy(accuracy):
    pos, q, cell = random_box(60, density=0.05, seed=2, triclinic=True)
    pos.requires_grad_(True)
    ref_e = coulomb_energy(pos, q, cell, True, accuracy=1e-11, method="ewald")
    (ref_f,) = torch.autograd.grad(-ref_e, pos)
    e = coulomb_energy(pos, q, cell, True, accuracy=accuracy)
    (f,) = torch.autograd.grad(-e, pos)
    e, ref_e = e.detach(), ref_e.detach()
    assert abs(float(e - ref_e)) / abs(float(ref_e)) < accuracy
    assert float(torch.linalg.norm(f - ref_f) / torch.linalg.norm(ref_f)) < accuracy


@pytest.mark.parametrize("sigma", [None, 0.7])
def test_open_boundaries_equal_direct_pair_sum(sigma):
    rng = np.random.default_rng(0)
    pos = rng.normal(scale=4.0, size=(40, 3))
    q = rng.normal(size=40)
    ref = direct_open_energy(pos, q, sigma)
    e = coulomb_energy(torch.tensor(pos), torch.tensor(q), None, False, smearing=sigma)
    assert abs(float(e) - ref) < 1e-10 * abs(ref)
    # chunking does not change the result
    phi_small = _engine._open_potential(
        torch.tensor(pos), torch.tensor(q)[:, None], sigma or 0.0, chunk_size=7
    )
    phi = coulomb_potential(torch.tensor(pos), torch.tensor(q), None, False, smearing=sigma)
    assert torch.allclose(phi_small[:, 0] * COULOMB_CONSTANT, phi, rtol=0, atol=1e-12)


def test_potential_is_energy_gradient_and_multichannel():
    pos, q, cell = random_box(30, seed=4)
    q2 = torch.stack([q, torch.roll(q, 1)], dim=1).requires_grad_(True)
    e = coulomb_energy(pos, q2, cell, True, smearing=0.9)
    phi = coulomb_potential(pos, q2.detach(), cell, True, smearing=0.9)
    (g,) = torch.autograd.grad(e.sum(), q2)
    assert e.shape == (2,)
    assert torch.allclose(g, phi, atol=1e-9)


def _slab(seed=0, net=0.0):
    rng = np.random.default_rng(seed)
    n = 16
    cell = torch.tensor([[8.0, 0.0, 0.0], [1.5, 7.0, 0.0], [0.0, 0.0, 30.0]], dtype=torch.float64)
    frac = rng.random((n, 2))
    pos = np.concatenate([frac @ cell[:2, :2].numpy(), rng.random((n, 1)) * 6.0], axis=1)
    q = rng.normal(size=n)
    q = q - q.mean() + net / n
    return torch.tensor(pos), torch.tensor(q), cell


@pytest.mark.parametrize("net", [0.0, 1.0])
def test_slab_independent_of_vacuum(net):
    pos, q, cell = _slab(net=net)
    # different accuracy targets give different vacuum heights; energies must agree
    e1 = coulomb_energy(pos, q, cell, [True, True, False], accuracy=1e-6, method="ewald")
    assert _engine._slab_height(pos, cell[:2], 1e-6) != _engine._slab_height(pos, cell[:2], 1e-10)
    e2 = coulomb_energy(pos, q, cell, [True, True, False], accuracy=1e-10, method="ewald")
    assert abs(float(e1 - e2)) < 1e-5 * abs(float(e2))
    # the c vector the user gives is irrelevant
    cell2 = cell.clone()
    cell2[2, 2] = 12.0
    e3 = coulomb_energy(pos, q, cell2, [True, True, False], accuracy=1e-10, method="ewald")
    assert abs(float(e3 - e2)) < 1e-9 * abs(float(e2))


def test_slab_of_far_apart_dipolar_layers_is_not_a_3d_crystal():
    # a single charged-layer dipole: the slab energy must differ from the naive 3D sum in
    # the user's cell (which lacks the dipole correction) by the Yeh-Berkowitz term
    pos, q, cell = _slab(seed=5)
    e_slab = coulomb_energy(pos, q, cell, [True, True, False], accuracy=1e-10)
    e_3d = coulomb_energy(pos, q, cell, True, accuracy=1e-10)
    m_z = float((q * pos[:, 2]).sum())
    expected = 2 * math.pi * COULOMB_CONSTANT * m_z**2 / float(torch.linalg.det(cell))
    # the 3D cell (30 Å, ~24 Å vacuum) is close to EW3DC without correction
    assert abs(float(e_slab - e_3d) - expected) < 0.02 * abs(expected)


def test_slab_forces_match_finite_differences():
    pos, q, cell = _slab(seed=2, net=0.5)
    pos = pos.requires_grad_(True)
    e = coulomb_energy(pos, q, cell, [True, True, False], smearing=0.8)
    (g,) = torch.autograd.grad(e, pos)
    h = 1e-5
    for i, a in [(0, 0), (3, 2), (7, 1), (11, 2)]:
        p1, p2 = pos.detach().clone(), pos.detach().clone()
        p1[i, a] += h
        p2[i, a] -= h
        fd = (
            coulomb_energy(p1, q, cell, [True, True, False], smearing=0.8)
            - coulomb_energy(p2, q, cell, [True, True, False], smearing=0.8)
        ) / (2 * h)
        assert abs(float((fd - g[i, a]).detach())) < 1e-6 * max(1.0, abs(float(fd)))


def test_parameters_are_cached_per_cell():
    pos, q, cell = random_box(50, seed=7)
    _engine._PARAMETER_CACHE.clear()
    coulomb_energy(pos, q, cell, True, accuracy=1e-5)
    coulomb_energy(pos + 0.3, q, cell, True, accuracy=1e-5)
    assert len(_engine._PARAMETER_CACHE) == 1
    coulomb_energy(pos, q, cell * 1.2, True, accuracy=1e-5)
    assert len(_engine._PARAMETER_CACHE) == 2


def test_net_charge_is_noted_once(caplog):
    pos, q, cell = random_box(20, seed=8, neutral=False)
    _engine._NET_CHARGE_NOTED["done"] = False
    with caplog.at_level("INFO", logger="mace_lr.electrostatics._engine"):
        coulomb_energy(pos, q, cell, True)
        coulomb_energy(pos, q, cell, True)
    notes = [r for r in caplog.records if "neutralising background" in r.message]
    assert len(notes) == 1


def test_input_validation_messages():
    pos, q, cell = random_box(10, seed=0)
    with pytest.raises(
        ValueError, match=r"`positions` must be a tensor with shape \[n_atoms, 3\], got \(10, 2\)"
    ):
        coulomb_energy(pos[:, :2], q, cell, True)
    with pytest.raises(ValueError, match=r"`charges` must be a tensor with shape \[n_atoms\]"):
        coulomb_energy(pos, q[:5], cell, True)
    with pytest.raises(ValueError, match=r"`cell` must be a tensor with shape \[3, 3\]"):
        coulomb_energy(pos, q, cell[:2], True)
    with pytest.raises(ValueError, match="need a cell with non-zero volume"):
        coulomb_energy(pos, q, torch.zeros(3, 3, dtype=torch.float64), True)
    with pytest.raises(ValueError, match=r"`pbc` must be"):
        coulomb_energy(pos, q, cell, [True, False, True])
    with pytest.raises(ValueError, match="dtype"):
        coulomb_energy(pos, q.float(), cell, True)


def test_slab_height_does_not_follow_the_atoms():
    pos, q, cell = _slab(seed=3, net=2.0)
    height = float(cell[2, 2])
    h0 = _engine._slab_height(pos, cell[:2], 1e-6, height)
    moved = pos.clone()
    moved[:, 2] *= 1.3  # the slab breathes inside its cell
    assert _engine._slab_height(moved, cell[:2], 1e-6, height) == h0
    # a net-charged slab's energy is continuous along such a path
    e = [
        float(coulomb_energy(pos + t * (moved - pos), q, cell, [True, True, False], accuracy=1e-6))
        for t in (0.0, 0.5, 1.0)
    ]
    assert abs(e[1] - 0.5 * (e[0] + e[2])) < 0.05 * abs(e[2] - e[0]) + 1e-6


@pytest.mark.parametrize("method", ["ewald", "p3m"])
def test_float32_cell_gradients_under_float64_default(method):
    # mace sets the default dtype to float64; float32 models must still get stress
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        atoms, q, _, _ = madelung_system("NaCl")
        pos = torch.tensor(atoms.positions, dtype=torch.float32, requires_grad=True)
        cell = torch.tensor(atoms.cell[:], dtype=torch.float32, requires_grad=True)
        energy = coulomb_energy(pos, q.float(), cell, True, method=method, accuracy=1e-4)
        g_pos, g_cell = torch.autograd.grad(energy, [pos, cell])
        assert g_pos.dtype == torch.float32 and bool(torch.isfinite(g_cell).all())
    finally:
        torch.set_default_dtype(previous)


@pytest.mark.parametrize("pbc", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_coincident_gaussian_sites_are_finite_and_smooth(pbc, dtype):
    """A Gaussian on top of another (a Wannier centroid on its ion) has the finite pair
    energy k_e q1 q2 √(2/π)/σ and zero, finite forces; a tiny separation changes it by
    O(r²). Before the clamp the gradient was NaN and float32 lost the real-space term.
    """
    sigma = 0.8
    cell = torch.eye(3, dtype=torch.float64) * 9.0
    base = torch.tensor(
        [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [4.2, 3.1, 5.0], [6.0, 6.5, 2.2]], dtype=torch.float64
    )
    q = torch.tensor([6.0, -8.0, 1.0, 1.0], dtype=torch.float64)

    def energy(pos, d):
        return coulomb_energy(
            pos.to(d), q.to(d), cell.to(d) if pbc else None, pbc, smearing=sigma, accuracy=1e-8
        )

    pos = base.clone().to(dtype).requires_grad_(True)
    e = energy(pos, dtype)
    (grad,) = torch.autograd.grad(e, pos)
    e = e.detach()
    assert torch.isfinite(grad).all()
    shifted = base.clone()
    shifted[1, 0] += 1e-6
    e_ref = energy(shifted, torch.float64)
    tol = 1e-7 if dtype == torch.float64 else 1e-4
    assert abs(float(e) - float(e_ref)) <= tol * abs(float(e_ref)), (float(e), float(e_ref))
    # the coincident pair contributes its limit k_e q1 q2 √(2/π)/σ to the exact pair sum
    if not pbc:
        exact = 0.0
        for i in range(4):
            for j in range(i + 1, 4):
                r = float(torch.linalg.norm(base[i] - base[j]))
                v = (
                    math.sqrt(2.0 / math.pi) / sigma
                    if r == 0.0
                    else math.erf(r / (math.sqrt(2.0) * sigma)) / r
                )
                exact += COULOMB_CONSTANT * float(q[i] * q[j]) * v
        assert abs(float(e) - exact) <= tol * abs(exact), (float(e), exact)
    # gradient on the coincident pair: the other charges pull both, the pair itself adds nothing
    g_ref = torch.autograd.functional.jacobian(lambda p: energy(p, torch.float64), shifted)
    assert float((grad.double() - g_ref).abs().max()) <= (1e-5 if dtype == torch.float64 else 1e-2)


@pytest.mark.parametrize("sigma", [0.0, 1.0])
def test_energy_and_forces_continuous_as_a_pair_crosses_the_real_space_cutoff(sigma):
    """Shifted-force truncation: no jump of k_e q_i q_j v_sr(r_c) when a pair leaves the
    real-space cutoff (it broke finite differences for large ion/centroid charges)."""
    positions, q, cell = random_box(100, density=0.05, seed=3)
    q[0], q[1] = 7.0, -8.0
    params = _engine._cached_parameters(cell, 100, sigma, 1e-3, "ewald")
    assert 0.0 < params.rcut < 0.8 * float(cell[0, 0])
    value, _ = _kernels._short_range_value_and_slope(params.rcut, sigma, params.split)
    jump = COULOMB_CONSTANT * 56.0 * value  # what plain truncation would add
    assert jump > 1e-6

    def energy_and_force(r):
        pos = positions.clone()
        pos[1] = pos[0] + torch.tensor([r, 0.0, 0.0], dtype=torch.float64)
        pos.requires_grad_(True)
        e = coulomb_energy(pos, q, cell, True, smearing=sigma or None, accuracy=1e-3, method="ewald")
        (g,) = torch.autograd.grad(e, pos)
        return float(e.detach()), g[1, 0].item()

    h = 1e-7
    e_in, g_in = energy_and_force(params.rcut - h)
    e_out, g_out = energy_and_force(params.rcut + h)
    assert abs(e_out - e_in - 0.5 * (g_in + g_out) * 2 * h) < 1e-3 * jump
    # the force changes smoothly too: the step across r_c matches the step just inside it
    _, slope = _kernels._short_range_value_and_slope(params.rcut, sigma, params.split)
    _, g_in2 = energy_and_force(params.rcut - 3 * h)
    assert abs((g_out - g_in) - (g_in - g_in2)) < 1e-3 * COULOMB_CONSTANT * 56.0 * abs(slope)
