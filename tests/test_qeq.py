"""Charge equilibration: solvers, derivatives, the `qeq` block, electrodes, nonlocality."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk

from mace_lr import augment
from mace_lr.analysis import locality_probe, plot_locality
from mace_lr.electrostatics import COULOMB_CONSTANT as KE
from mace_lr.electrostatics import ChargeEquilibrationError, solve_qeq
from mace_lr.testing import evaluate, make_test_model, perturb_blocks, run_block_contract

SQRT2, SQRTPI = math.sqrt(2.0), math.sqrt(math.pi)


def _random_system(kind: str, n: int = 24, seed: int = 0):
    """Positions (no overlaps closer than 1.6 Å), cell, pbc and per-atom QEq parameters."""
    rng = np.random.default_rng(seed)
    length = 8.0
    pos: list = []
    while len(pos) < n:
        trial = rng.uniform(0.0, length, 3)
        if kind == "slab":
            trial[2] = rng.uniform(0.0, 5.0)
        if all(np.linalg.norm(trial - p) > 1.6 for p in pos):
            pos.append(trial)
    cell = np.eye(3) * length
    pbc = {"periodic": (True, True, True), "open": (False, False, False), "slab": (True, True, False)}[kind]
    if kind == "open":
        cell = np.zeros((3, 3))
    if kind == "slab":
        cell[2, 2] = 12.0
    t = lambda x: torch.tensor(np.asarray(x), dtype=torch.float64)  # noqa: E731
    return {
        "positions": t(pos),
        "cell": t(cell),
        "pbc": pbc,
        "chi": t(rng.normal(0.0, 1.0, n)),
        "hardness": t(rng.uniform(2.0, 5.0, n)),
        "widths": t(rng.uniform(0.6, 1.2, n)),
    }


def _solve(system, **kwargs):
    return solve_qeq(
        system["positions"],
        system["chi"],
        system["hardness"],
        system["widths"],
        system["cell"],
        system["pbc"],
        accuracy=kwargs.pop("accuracy", 1e-8),
        **kwargs,
    )


@pytest.mark.parametrize("total", [0.0, 1.0])
def test_two_site_matches_analytic_solution(total):
    r = 2.3
    pos = torch.tensor([[0.0, 0.0, 0.0], [r, 0.0, 0.0]], dtype=torch.float64)
    chi = torch.tensor([1.2, -0.7], dtype=torch.float64)
    hard = torch.tensor([3.0, 4.5], dtype=torch.float64)
    width = torch.tensor([0.8, 1.1], dtype=torch.float64)
    d1 = 3.0 + KE / (SQRTPI * 0.8)
    d2 = 4.5 + KE / (SQRTPI * 1.1)
    c = KE * math.erf(r / (SQRT2 * math.hypot(0.8, 1.1))) / r
    # minimise χ1 q1 + χ2 q2 + ½ d1 q1² + ½ d2 q2² + c q1 q2 with q2 = Q − q1
    q1 = (-0.7 - 1.2 + (d2 - c) * total) / (d1 + d2 - 2.0 * c)
    q2 = total - q1
    energy = 1.2 * q1 - 0.7 * q2 + 0.5 * d1 * q1**2 + 0.5 * d2 * q2**2 + c * q1 * q2
    for solver in ("dense", "cg"):
        out = solve_qeq(pos, chi, hard, width, total_charge=total, solver=solver, tol=1e-12)
        assert torch.allclose(out["charges"], torch.tensor([q1, q2], dtype=torch.float64), atol=1e-10)
        assert abs(float(out["energy"]) - energy) < 1e-10


@pytest.mark.parametrize("kind", ["periodic", "open", "slab"])
@pytest.mark.parametrize("total", [0.0, -1.0, 2.0])
def test_charges_sum_to_total_charge(kind, total):
    system = _random_system(kind, seed=3)
    for solver in ("dense", "cg"):
        q = _solve(system, total_charge=total, solver=solver, tol=1e-8)["charges"]
        assert abs(float(q.sum()) - total) < 1e-8, (kind, total, solver)
        assert float(q.abs().max()) > 1e-3  # charges actually move


@pytest.mark.parametrize("kind", ["periodic", "slab", "open"])
def test_dense_and_cg_agree_on_charges_energy_forces_and_gradients(kind):
    system = _random_system(kind, seed=1)
    results = {}
    for solver in ("dense", "cg"):
        pos = system["positions"].clone().requires_grad_(True)
        chi = system["chi"].clone().requires_grad_(True)
        hard = system["hardness"].clone().requires_grad_(True)
        width = system["widths"].clone().requires_grad_(True)
        cell, pbc = system["cell"], system["pbc"]
        out = solve_qeq(pos, chi, hard, width, cell, pbc, -1.0, solver=solver, tol=1e-10, accuracy=1e-8)
        # a loss that depends on the charges themselves, not only on the stationary energy
        loss = out["energy"] + (out["charges"] ** 2 * torch.linspace(0.5, 2.0, len(pos))).sum()
        grads = torch.autograd.grad(loss, [pos, chi, hard, width])
        results[solver] = [out["charges"].detach(), out["energy"].detach(), *grads]
    names = ["charges", "energy", "d/dR", "d/dchi", "d/dJ", "d/dsigma"]
    for name, a, b in zip(names, results["dense"], results["cg"]):
        err = float((a - b).abs().max()) / max(float(a.abs().max()), 1e-12)
        assert err < 1e-6, f"{kind}: dense and CG differ in {name} by {err:.2e} (relative)"


def test_charge_derivatives_match_finite_differences():
    system = _random_system("periodic", n=12, seed=2)
    pos = system["positions"].clone().requires_grad_(True)
    out = _solve({**system, "positions": pos}, total_charge=1.0, solver="cg", tol=1e-12)
    (grad,) = torch.autograd.grad(out["charges"][0], pos)
    h = 1e-5
    for k, axis in [(0, 0), (5, 2), (11, 1)]:
        plus, minus = system["positions"].clone(), system["positions"].clone()
        plus[k, axis] += h
        minus[k, axis] -= h
        qp = _solve({**system, "positions": plus}, total_charge=1.0, solver="dense")["charges"][0]
        qm = _solve({**system, "positions": minus}, total_charge=1.0, solver="dense")["charges"][0]
        fd = float(qp - qm) / (2 * h)
        assert abs(fd - float(grad[k, axis])) < 1e-6 * max(1.0, abs(fd)), (k, axis, fd, float(grad[k, axis]))


@pytest.mark.parametrize("solver", ["dense", "cg"])
def test_training_gradient_of_a_force_loss_matches_finite_differences(solver):
    """Second derivatives through q*: d/dχ of a loss on forces of a non-stationary energy.

    The energy adds Σ c_i q_i² to the QEq energy (like a fourth-generation readout), so
    the forces depend on ∂q*/∂R and the loss gradient on ∂²q*/∂R∂χ: two Newton steps.
    """
    system = _random_system("open", n=8, seed=4)
    weights = torch.linspace(0.2, 1.0, 8, dtype=torch.float64)

    def loss_of(chi, create_graph):
        pos = system["positions"].clone().requires_grad_(True)
        out = solve_qeq(
            pos,
            chi,
            system["hardness"],
            system["widths"],
            total_charge=0.5,
            solver=solver,
            tol=1e-12,
            newton_steps=2,
        )
        energy = out["energy"] + (weights * out["charges"] ** 2).sum()
        (forces,) = torch.autograd.grad(energy, pos, create_graph=create_graph)
        return (forces**2).sum()

    chi = system["chi"].clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss_of(chi, True), chi)
    h = 1e-5
    for k in (0, 3, 7):
        plus, minus = system["chi"].clone(), system["chi"].clone()
        plus[k] += h
        minus[k] -= h
        fd = (float(loss_of(plus, False)) - float(loss_of(minus, False))) / (2 * h)
        assert abs(fd - float(grad[k])) < 1e-5 * max(1.0, abs(fd)), (k, fd, float(grad[k]))


def test_cg_failure_is_an_error_that_states_the_residual():
    system = _random_system("periodic", seed=5)
    with pytest.raises(ChargeEquilibrationError, match=r"residual .* > tol"):
        _solve(system, solver="cg", tol=1e-10, max_iter=2)


def test_invalid_parameters_are_rejected():
    system = _random_system("open", n=4)
    with pytest.raises(ValueError, match="hardness"):
        _solve({**system, "hardness": -system["hardness"]})
    with pytest.raises(ValueError, match="widths"):
        _solve({**system, "widths": torch.zeros(4, dtype=torch.float64)})


def test_qeq_block_contract_dense():
    run_block_contract("qeq")


def test_qeq_block_contract_fourth_generation_cg():
    run_block_contract("qeq", {"fourth_generation": True, "solver": "cg"})


def _charged_cluster(charge: float, field=(0.0, 0.0, 0.0)) -> Atoms:
    rng = np.random.default_rng(7)
    grid = np.array([[i, j, k] for i in range(2) for j in range(2) for k in range(2)], float) * 2.82
    numbers = [11 if (i + j + k) % 2 == 0 else 17 for i, j, k in (grid / 2.82).astype(int)]
    atoms = Atoms(numbers=numbers, positions=grid + rng.normal(scale=0.1, size=grid.shape))
    atoms.info["charge"] = charge
    atoms.info["external_field"] = np.asarray(field, dtype=float)
    return atoms


def test_identity_at_init_for_charged_structures_in_a_field():
    base = make_test_model()
    model = augment(base, "qeq")
    for charge, field in [(1.0, (0.0, 0.0, 0.0)), (-2.0, (0.05, -0.02, 0.1))]:
        atoms = _charged_cluster(charge, field)
        ref = evaluate(base, [atoms])
        got = evaluate(model, [atoms])
        assert float((ref["energy"] - got["energy"]).abs().max()) < 1e-10
        assert float((ref["forces"] - got["forces"]).abs().max()) < 1e-10
        assert abs(float(got["charges"].sum()) - charge) < 1e-8  # charges are live at init
    # the coupling gets a gradient at initialisation (no saddle point)
    atoms = _charged_cluster(0.0)
    from mace_lr._data import atoms_to_batch

    batch = atoms_to_batch([atoms], model.atomic_numbers, float(model.r_max), heads=model.heads)
    out = model(batch, training=True)
    (grad,) = torch.autograd.grad(out["energy"].sum(), model.blocks["qeq"].coupling)
    assert abs(float(grad)) > 1e-3


def test_charges_sum_to_total_charge_through_the_model():
    model = perturb_blocks(augment(make_test_model(), "qeq"))
    systems = [_charged_cluster(1.0), _charged_cluster(-1.0), _charged_cluster(0.0)]
    periodic = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
    periodic.info["charge"] = 2.0
    systems.append(periodic)
    out = evaluate(model, systems)
    q = out["charges"].numpy()
    sums = [q[0:8].sum(), q[8:16].sum(), q[16:24].sum(), q[24:32].sum()]
    np.testing.assert_allclose(sums, [1.0, -1.0, 0.0, 2.0], atol=1e-8)


def _capacitor(potential: float) -> Atoms:
    """Two 2x2 Na 'electrode' planes around an NaCl electrolyte layer, as a slab."""
    a = 2.82
    rows = []
    numbers = []
    tags = []
    for z, tag, number in [(0.0, 1, 11), (3.0, 0, 11), (3.0, 0, 17), (6.0, 2, 11)]:
        for i in range(2):
            for j in range(2):
                if tag == 0 and (i + j) % 2 != (0 if number == 11 else 1):
                    continue
                rows.append([i * a, j * a, z + 0.05 * (i - j)])
                numbers.append(number)
                tags.append(tag)
    atoms = Atoms(numbers=numbers, positions=rows, cell=[2 * a, 2 * a, 20.0], pbc=[True, True, False])
    atoms.positions[:, 2] += 5.0
    atoms.arrays["electrode"] = np.asarray(tags)
    atoms.info["electrode_potential"] = potential
    atoms.info["charge"] = 0.0
    return atoms


def test_constant_potential_electrodes():
    model = perturb_blocks(augment(make_test_model(), {"qeq": {"coupling_init": 1.0}}))
    outs = {v: evaluate(model, [_capacitor(v)]) for v in (0.0, 1.0, 2.0)}
    q1 = {v: float(o["qeq_electrode_charge"][0]) for v, o in outs.items()}
    tags = _capacitor(0.0).arrays["electrode"]
    for v, out in outs.items():
        q = out["charges"].numpy()
        assert abs(q[tags > 0].sum()) < 1e-8  # the electrode pair stays neutral
        assert abs(q[tags == 0].sum()) < 1e-8  # the electrolyte keeps its total charge
        assert abs(q[tags == 1].sum() - q1[v]) < 1e-12
    # a capacitor: the charge on electrode 1 grows linearly with the potential difference
    dq1, dq2 = q1[1.0] - q1[0.0], q1[2.0] - q1[1.0]
    assert dq1 > 1e-4
    assert abs(dq1 - dq2) < 1e-6 * max(1.0, abs(dq1))
    missing = _capacitor(1.0)
    del missing.info["electrode_potential"]
    with pytest.raises(KeyError, match="electrode_potential"):
        evaluate(model, [missing])


def _chain(n: int = 14, spacing: float = 2.8) -> Atoms:
    atoms = Atoms(
        numbers=[11 if i % 2 == 0 else 17 for i in range(n)],
        positions=[[i * spacing, 0.1 * (i % 3), 0.0] for i in range(n)],
    )
    atoms.info["charge"] = 0.0
    return atoms


def test_locality_probe_qeq_is_nonlocal_and_les_is_local(tmp_path):
    base = make_test_model(r_max=4.0, num_interactions=2)
    receptive = 2 * 4.0
    atoms = _chain()
    probes = {}
    for name in ("les", "qeq"):
        model = perturb_blocks(augment(base, name))
        probes[name] = locality_probe(model, atoms, atoms_indices=[0, 1])
    far = probes["les"]["distance"] > receptive + 0.5
    assert far.sum() > 10  # the chain is longer than twice the receptive field
    assert np.all(probes["les"]["response"][far] == 0.0)  # exactly zero
    assert np.all(probes["qeq"]["response"][far] > 1e-6)
    near = (probes["les"]["distance"] > 0) & (probes["les"]["distance"] < 3.0)
    assert np.all(probes["les"]["response"][near] > 0.0)
    path = tmp_path / "locality.png"
    plot_locality(probes, path, cutoff=receptive)
    assert path.stat().st_size > 1000


def test_qeq_warm_start_gives_the_same_charges():
    model = perturb_blocks(augment(make_test_model(), {"qeq": {"solver": "cg", "tol": 1e-10}}))
    model.eval()
    atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True) * (2, 1, 1)
    atoms.rattle(0.1, seed=3)
    atoms.info["charge"] = 0.0
    first = evaluate(model, [atoms])["charges"]
    moved = atoms.copy()
    moved.rattle(0.01, seed=4)
    warm = evaluate(model, [moved])["charges"]
    cold_model = copy.deepcopy(model)
    cold_model.blocks["qeq"].warm_start = False
    cold = evaluate(cold_model, [moved])["charges"]
    assert float((warm - cold).abs().max()) < 1e-8
    assert float((warm - first).abs().max()) > 1e-6


def test_spectral_preconditioner_same_charges_fewer_iterations():
    atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True) * (3, 3, 3)
    atoms.rattle(0.1, seed=0)
    n = len(atoms)
    rng = np.random.default_rng(0)
    na = torch.tensor(atoms.numbers == 11)
    args = (
        torch.tensor(atoms.positions),
        torch.where(na, 2.8, 8.3).double() + torch.tensor(rng.normal(0.0, 0.3, n)),
        torch.where(na, 1.0, 1.4).double(),
        torch.where(na, 1.66, 1.02).double(),
        torch.tensor(np.asarray(atoms.cell)),
        (True, True, True),
        1.0,
    )
    out = {
        pc: solve_qeq(*args, solver="cg", tol=1e-9, accuracy=1e-6, preconditioner=pc)
        for pc in ("jacobi", "spectral")
    }
    diff = float((out["jacobi"]["charges"] - out["spectral"]["charges"]).abs().max())
    assert diff < 1e-7
    assert abs(float(out["spectral"]["charges"].sum()) - 1.0) < 1e-8
    assert int(out["spectral"]["iterations"]) < 0.8 * int(out["jacobi"]["iterations"])


def test_calculator_reports_electrode_charge_and_follows_the_potential():
    from mace_lr import MACELRCalculator

    model = perturb_blocks(augment(make_test_model(), {"qeq": {"coupling_init": 1.0}}))
    atoms = _capacitor(0.5)
    atoms.calc = MACELRCalculator(model, default_dtype="float64")
    q_half = atoms.calc.get_property("electrode_charge", atoms)
    atoms.info["electrode_potential"] = 1.5  # a change of bias alone must trigger a new calculation
    q_more = atoms.calc.get_property("electrode_charge", atoms)
    assert q_more - q_half > 1e-4
    forces = atoms.get_forces()
    assert np.isfinite(forces).all()


def test_spectral_preconditioner_is_positive_definite_for_a_wide_spread_of_hardness():
    from mace_lr.electrostatics._qeq import GaussianCoulombOperator, SpectralPreconditioner

    atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True) * (
        6,
        6,
        6,
    )  # 1728 atoms: the unscaled version was indefinite here
    atoms.rattle(0.3, seed=1)
    n = len(atoms)
    rng = np.random.default_rng(2)
    hardness = torch.tensor(np.exp(rng.uniform(np.log(0.3), np.log(12.0), n)))  # a 40x spread
    widths = torch.tensor(rng.uniform(0.7, 1.8, n))
    op = GaussianCoulombOperator(
        torch.tensor(atoms.positions),
        torch.tensor(np.asarray(atoms.cell)),
        (True, True, True),
        widths,
        hardness,
        accuracy=1e-4,
        base_smearing=float(widths.min()) * math.sqrt(2.0),
    ).detached()
    m = SpectralPreconditioner(op)(torch.eye(n, dtype=torch.float64))
    assert float((m - m.T).abs().max()) < 1e-12
    eig = torch.linalg.eigvalsh(0.5 * (m + m.T))
    assert float(eig.min()) > 0.0
    # and it is not plain Jacobi: the long-wavelength correction is there
    assert float((m - torch.diag(1.0 / op.diagonal)).abs().max()) > 1e-3
    chi = torch.tensor(rng.normal(0.0, 1.0, n))
    args = (
        torch.tensor(atoms.positions),
        chi,
        hardness,
        widths,
        torch.tensor(np.asarray(atoms.cell)),
        (True,) * 3,
    )
    out = {
        pc: solve_qeq(*args, solver="cg", tol=1e-8, accuracy=1e-4, preconditioner=pc)
        for pc in ("jacobi", "spectral")
    }
    assert float((out["jacobi"]["charges"] - out["spectral"]["charges"]).abs().max()) < 1e-6


def _nacl_operator(cells, rattle=0.2, seed=0, base_smearing=1.4, accuracy=1e-4, shear=0.0):
    from mace_lr.electrostatics._qeq import GaussianCoulombOperator

    atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True) * cells
    if shear:
        cell = np.asarray(atoms.cell).copy()
        cell[1] += shear * cell[0]
        cell[2] += 0.5 * shear * cell[0] - 0.3 * shear * cell[1]
        atoms.set_cell(cell, scale_atoms=True)
    atoms.rattle(rattle, seed=seed)
    rng = np.random.default_rng(seed)
    n = len(atoms)
    return GaussianCoulombOperator(
        torch.tensor(atoms.positions),
        torch.tensor(np.asarray(atoms.cell)),
        (True, True, True),
        torch.tensor(rng.uniform(0.8, 1.7, n)),
        torch.tensor(rng.uniform(0.5, 4.0, n)),
        accuracy=accuracy,
        base_smearing=base_smearing,
    )


def _engine_matvec(op, q):
    """A q from the public engine potential plus the pair correction, on a fresh list."""
    from vesin import NeighborList

    from mace_lr.electrostatics import coulomb_potential

    s0 = op.base_smearing
    phi = coulomb_potential(op.positions, q, op.cell, op.pbc, s0 if s0 > 0 else None, op.accuracy)
    i, j, shifts = NeighborList(cutoff=op.pair_cutoff, full_list=True).compute(
        points=op.positions.numpy(), box=op.cell.numpy(), periodic=True, quantities="ijS"
    )
    i, j = torch.as_tensor(i.astype(np.int64)), torch.as_tensor(j.astype(np.int64))
    vec = op.positions[j] - op.positions[i] + torch.as_tensor(shifts, dtype=torch.float64) @ op.cell
    dist = torch.linalg.norm(vec, dim=-1)
    gamma = torch.sqrt(op.widths[i] ** 2 + op.widths[j] ** 2)
    base = torch.erf(dist / (SQRT2 * s0)) if s0 > 0 else torch.ones_like(dist)
    v = KE * (torch.erf(dist / (SQRT2 * gamma)) - base) / dist
    phi = phi + torch.zeros_like(q).index_add(0, i, v[:, None] * q[j])
    return phi + op.diagonal[:, None] * q


@pytest.mark.parametrize("base_smearing,shear", [(0.0, 0.0), (1.4, 0.0), (1.4, 0.35)])
def test_cached_operator_is_the_engine_matrix(base_smearing, shear):
    """The precomputed P3M product used inside CG is the engine's operator, to rounding
    (orthorhombic and triclinic cells)."""
    op = _nacl_operator((4, 3, 3), base_smearing=base_smearing, shear=shear)  # 288 atoms: P3M
    frozen = op.detached()
    assert frozen._cached is not None
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(op.positions.shape[0], 3, generator=gen, dtype=torch.float64)
    q[:, 1] += 0.2  # a net-charged column: the background term
    engine = _engine_matvec(op, q)
    assert float((op.matvec(q) - engine).abs().max() / engine.abs().max()) < 1e-10
    cached = frozen.matvec(q)
    err = float((engine - cached).abs().max() / engine.abs().max())
    assert err < 1e-10, err
    # symmetric, and its autograd function returns A g (double backward too)
    x = q[:, :1].clone().requires_grad_(True)
    y = frozen.matvec(x)
    (g,) = torch.autograd.grad((y * q[:, 2:3]).sum(), x, create_graph=True)
    assert float((g - frozen.matvec(q[:, 2:3])).abs().max()) < 1e-10 * float(g.abs().max())


def test_spectral_preconditioner_floor_bounds_its_spectrum_for_any_geometry():
    """M⁻¹ = D^-1/2 (K² + ε) D^-1/2 is positive definite by construction, even for a
    clustered, far from uniform geometry (empty mesh regions, several atoms per cell)."""
    from mace_lr.electrostatics._qeq import GaussianCoulombOperator, SpectralPreconditioner

    rng = np.random.default_rng(3)
    n, length = 400, 24.0
    centres = rng.uniform(0.0, length, (6, 3))
    pos = centres[rng.integers(0, 6, n)] + rng.normal(0.0, 1.5, (n, 3))
    op = GaussianCoulombOperator(
        torch.tensor(pos),
        torch.eye(3, dtype=torch.float64) * length,
        (True, True, True),
        torch.tensor(rng.uniform(0.6, 1.8, n)),
        torch.tensor(np.exp(rng.uniform(np.log(0.2), np.log(15.0), n))),
        accuracy=1e-4,
        base_smearing=0.9,
    ).detached()
    pc = SpectralPreconditioner(op)
    m = pc(torch.eye(n, dtype=torch.float64))
    assert float((m - m.T).abs().max()) < 1e-12
    eig = torch.linalg.eigvalsh(0.5 * (m + m.T))
    assert float(eig.min()) >= 0.999 * pc.floor / float(op.diagonal.max())


def test_stationary_energy_needs_no_backward_solve(monkeypatch):
    """Forces of the QEq energy come from fixed charges: one CG solve, none in backward."""
    from mace_lr.electrostatics._qeq import ConstrainedSolver

    calls = []
    original = ConstrainedSolver._pcg

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ConstrainedSolver, "_pcg", counting)
    system = _random_system("periodic", seed=6)
    pos = system["positions"].clone().requires_grad_(True)
    out = _solve({**system, "positions": pos}, solver="cg", tol=1e-10)
    assert len(calls) == 1
    (forces,) = torch.autograd.grad(out["energy"], pos)
    assert len(calls) == 1
    # the charges themselves still carry the implicit derivative (a backward solve)
    pos2 = system["positions"].clone().requires_grad_(True)
    out2 = _solve({**system, "positions": pos2}, solver="cg", tol=1e-10)
    torch.autograd.grad((out2["charges"] ** 2).sum(), pos2)
    assert len(calls) == 3
    # the forces are those of the dense solver (same operator)
    pos3 = system["positions"].clone().requires_grad_(True)
    (dense,) = torch.autograd.grad(_solve({**system, "positions": pos3}, solver="dense")["energy"], pos3)
    assert float((forces - dense).abs().max()) < 1e-7 * float(dense.abs().max())


@pytest.mark.parametrize("kind", ["periodic", "open"])
def test_training_gradient_of_a_force_loss_of_the_stationary_energy(kind):
    """Second derivatives of the bare QEq energy (one Newton step): the −½ δqᵀAδq term."""
    system = _random_system(kind, n=10, seed=8)

    def loss_of(hardness, create_graph):
        pos = system["positions"].clone().requires_grad_(True)
        out = _solve(
            {**system, "positions": pos, "hardness": hardness}, solver="cg", tol=1e-12, total_charge=0.5
        )
        (forces,) = torch.autograd.grad(out["energy"], pos, create_graph=create_graph)
        return (forces**2).sum()

    hardness = system["hardness"].clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss_of(hardness, True), hardness)
    h = 1e-5
    for k in (0, 4, 9):
        plus, minus = system["hardness"].clone(), system["hardness"].clone()
        plus[k] += h
        minus[k] -= h
        fd = (float(loss_of(plus, False)) - float(loss_of(minus, False))) / (2 * h)
        assert abs(fd - float(grad[k])) < 1e-5 * max(1.0, abs(fd)), (k, fd, float(grad[k]))
