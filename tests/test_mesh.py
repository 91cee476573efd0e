"""The `mesh` block: learned k-space filter of atom features on a fixed-spacing mesh."""

import math

import mace  # noqa: F401
import numpy as np
import pytest
import torch
from ase.build import bulk, molecule
from mace_lr.plugins.mesh import MeshBlock, bspline_weights

import mace_lr
from mace_lr import testing as T
from mace_lr.electrostatics import COULOMB_CONSTANT, coulomb_energy
from mace_lr.nn import mesh_spacing_for

# fine mesh for the contract: its rotation check of an open cluster needs ~1e-8 (order 8:
# peak-normalised filter Gaussians give ~13x the energy scale, so absolute errors grew)
CONTRACT = {"spacing": 0.5, "order": 8, "smearing": 2.0, "max_width": 2.5, "channels": 2, "hidden": 8}
ELEMENTS = (1, 6, 8, 11, 17)


def test_mesh_block_contract():
    T.run_block_contract("mesh", config=CONTRACT)


@pytest.fixture(scope="module")
def trained():
    """Base model + mesh block with every block parameter moved off its initial value."""
    base = T.make_test_model(atomic_numbers=ELEMENTS, seed=2)
    model = mace_lr.augment(base, "mesh")
    return T.perturb_blocks(model, seed=5)


def _block_energy(model, atoms_list):
    return T.evaluate(model, atoms_list, compute_force=False)["mesh_energy"].numpy()


def test_bspline_weights_partition_of_unity():
    x = torch.tensor([[0.0, 0.3, 7.99], [-1.5, 2.25, 3.7]], dtype=torch.float64)
    for order in (2, 4, 6, 7):
        base, w = bspline_weights(x, order)
        assert torch.allclose(w.sum(-1), torch.ones(2, 3, dtype=torch.float64), atol=1e-14)
        assert bool((w >= 0).all())
        # first moment: the spline N_p(x - j) has its mean at j = x - p/2
        pts = base[:, :, None].to(x.dtype) - torch.arange(order, dtype=x.dtype)
        assert torch.allclose((w * pts).sum(-1), x - order / 2.0, atol=1e-12)


def _coulomb_mesh(block, atoms, charges, sigma):
    pos = torch.tensor(atoms.positions, requires_grad=True)
    cell = torch.tensor(atoms.cell[:]).unsqueeze(0)
    pbc = torch.tensor([atoms.pbc.tolist()])
    q = torch.tensor(charges)
    n = len(atoms)
    phi = block.mesh_potential(
        pos, q[:, None], cell, pbc, torch.zeros(n, dtype=torch.int64), torch.tensor([0, n]), kernel="coulomb"
    )[:, 0]
    self_energy = 0.5 * COULOMB_CONSTANT * math.sqrt(2.0 / math.pi) / sigma * (q**2).sum()
    energy = 0.5 * (q * phi).sum() - self_energy
    forces = -torch.autograd.grad(energy, pos)[0]
    ref_cell = cell[0] if atoms.pbc.any() else None
    ref = coulomb_energy(pos, q, ref_cell, atoms.pbc.tolist(), smearing=sigma, accuracy=1e-8)
    ref_forces = -torch.autograd.grad(ref, pos)[0]
    return float(energy.detach()), forces, float(ref.detach()), ref_forces


def test_coulomb_kernel_reproduces_engine_periodic():
    """Filter = k_e 4π/k² e^{-σ²k²/2}, values = charges: the engine's Gaussian-charge energy."""
    rng = np.random.default_rng(0)
    atoms = bulk("NaCl", "rocksalt", a=5.64) * (2, 2, 1)  # triclinic cell
    atoms.positions += rng.normal(scale=0.2, size=atoms.positions.shape)
    charges = np.where(atoms.numbers == 11, 0.8, -0.8) + rng.normal(scale=0.1, size=len(atoms))
    charges -= charges.mean()
    sigma = 1.5
    block = MeshBlock("8x0e", [11, 17], 4.0, smearing=sigma, spacing=0.375, order=8).double()
    e, f, e_ref, f_ref = _coulomb_mesh(block, atoms, charges, sigma)
    assert abs(e - e_ref) <= 1e-7 * abs(e_ref), (e, e_ref)
    assert float((f - f_ref).abs().max()) <= 1e-6 * float(f_ref.abs().max())


def test_coulomb_kernel_reproduces_engine_slab():
    """2D-periodic slab (vacuum along z): box sum plus the slab dipole term = engine's slab sum."""
    rng = np.random.default_rng(6)
    atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
    atoms.cell[2] = [0.0, 0.0, 30.0]
    atoms.pbc = [True, True, False]
    atoms.positions += rng.normal(scale=0.15, size=atoms.positions.shape)
    charges = np.where(atoms.numbers == 11, 1.0, -1.0)
    sigma = 1.5
    block = MeshBlock("8x0e", [11, 17], 4.0, smearing=sigma, spacing=0.5, order=6, max_width=3.0).double()
    e, f, e_ref, f_ref = _coulomb_mesh(block, atoms, charges, sigma)
    assert abs(e - e_ref) <= 1e-7 * abs(e_ref), (e, e_ref)
    assert float((f - f_ref).abs().max()) <= 5e-5 * float(f_ref.abs().max())


def test_coulomb_kernel_reproduces_engine_open():
    """Open molecule: the vacuum box (padding 3.5 s_max + p h per side) plus the dipole term
    approaches the exact pair sum; the residual is the images' quadrupole interaction."""
    rng = np.random.default_rng(7)
    atoms = molecule("CH3CH2OH")
    charges = rng.normal(scale=0.4, size=len(atoms))
    charges -= charges.mean()
    sigma = 1.5
    errors = []
    for max_width in (3.0, 6.0):
        block = MeshBlock(
            "8x0e", [1], 4.0, smearing=sigma, spacing=0.5, order=6, max_width=max_width
        ).double()
        e, f, e_ref, f_ref = _coulomb_mesh(block, atoms, charges, sigma)
        errors.append(abs(e - e_ref) / abs(e_ref))
    assert errors[1] <= 5e-5 and errors[1] < 0.3 * errors[0], errors
    assert float((f - f_ref).abs().max()) <= 5e-4 * float(f_ref.abs().max())


def test_supercell_consistency_exact_when_commensurate(trained):
    """a = 6 Å is an even multiple of the spacing (1 Å): the 2×2×2 mesh is the cell's mesh."""
    rng = np.random.default_rng(1)
    cell = bulk("NaCl", "rocksalt", a=6.0, cubic=True)
    cell.positions += rng.normal(scale=0.1, size=cell.positions.shape)
    e1 = _block_energy(trained, [cell])[0]
    e8 = _block_energy(trained, [cell * (2, 2, 2)])[0]
    assert abs(e1) > 1e-3
    assert abs(e8 - 8 * e1) <= 1e-8 * abs(8 * e1), (e8, 8 * e1)
    e27 = _block_energy(trained, [cell * (3, 3, 3)])[0]
    assert abs(e27 - 27 * e1) <= 1e-8 * abs(27 * e1), (e27, 27 * e1)


def test_supercell_consistency_otherwise_at_discretisation_level(trained):
    """a = 5 Å: 6 mesh points for the cell but 10 (not 12) for the 2×2×2 supercell."""
    rng = np.random.default_rng(1)
    cell = bulk("NaCl", "rocksalt", a=5.0, cubic=True)
    cell.positions += rng.normal(scale=0.1, size=cell.positions.shape)
    e1 = _block_energy(trained, [cell])[0]
    e8 = _block_energy(trained, [cell * (2, 2, 2)])[0]
    rel = abs(e8 - 8 * e1) / abs(8 * e1)
    assert rel <= 1e-5, rel


def test_two_distant_copies_are_additive(trained):
    rng = np.random.default_rng(2)
    mol = molecule("CH3CH2OH")
    mol.positions += rng.normal(scale=0.05, size=mol.positions.shape)
    far = mol.copy()
    far.positions += [50.0, 0.0, 0.0]
    e1 = _block_energy(trained, [mol])[0]
    e2 = _block_energy(trained, [mol + far])[0]
    assert abs(e1) > 1e-3
    assert abs(e2 - 2 * e1) <= 1e-6 * abs(2 * e1), (e2, 2 * e1)


def test_open_molecule_invariances(trained):
    rng = np.random.default_rng(3)
    mol = molecule("CH3CH2OH")
    mol.positions += rng.normal(scale=0.05, size=mol.positions.shape)
    e0 = _block_energy(trained, [mol])[0]
    moved = mol.copy()
    moved.positions += [3.3, -1.7, 0.45]
    assert abs(_block_energy(trained, [moved])[0] - e0) <= 1e-12 * max(1.0, abs(e0))
    perm = rng.permutation(len(mol))
    assert abs(_block_energy(trained, [mol[perm]])[0] - e0) <= 1e-12 * max(1.0, abs(e0))
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    rotated = mol.copy()
    rotated.positions = mol.positions @ q.T
    # rotation changes how the molecule sits on the mesh: the residual is the mesh
    # discretisation error, ~1e-5 at the defaults (spacing 1 Å, σ = 2 Å, order 4) ...
    coarse = abs(_block_energy(trained, [rotated])[0] - e0) / abs(e0)
    assert coarse <= 5e-5
    # ... and it falls like (h/2πσ)^p on a finer mesh of higher order
    base = T.make_test_model(atomic_numbers=ELEMENTS, seed=2)
    fine_model = T.perturb_blocks(mace_lr.augment(base, "mesh", spacing=0.5, order=6), seed=5)
    e_fine = _block_energy(fine_model, [mol])[0]
    fine = abs(_block_energy(fine_model, [rotated])[0] - e_fine) / abs(e_fine)
    assert fine <= 1e-7 and fine < 0.05 * coarse, (coarse, fine)


def test_forces_and_stress_match_finite_differences_nonzero_weights(trained):
    rng = np.random.default_rng(4)
    atoms = bulk("NaCl", "rocksalt", a=5.64) * (2, 1, 1)
    atoms.positions += rng.normal(scale=0.15, size=atoms.positions.shape)
    assert abs(_block_energy(trained, [atoms])[0]) > 1e-3
    T.assert_forces_match_finite_differences(trained, atoms, max_components=6)
    T.assert_stress_matches_finite_differences(trained, atoms)


def test_batch_of_equal_and_different_mesh_shapes(trained):
    rng = np.random.default_rng(5)
    systems = []
    for _ in range(2):
        a = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
        a.positions += rng.normal(scale=0.15, size=a.positions.shape)
        systems.append(a)
    systems.append(molecule("H2O"))
    T.assert_batch_consistency(trained, systems)


def test_bad_input_errors():
    with pytest.raises(ValueError, match="spacing"):
        MeshBlock("8x0e", [11], 4.0, spacing=0.0)
    with pytest.raises(ValueError, match="smearing <= max_width"):
        MeshBlock("8x0e", [11], 4.0, smearing=3.0, max_width=2.0)
    with pytest.raises(TypeError, match="unknown mesh option"):
        MeshBlock("8x0e", [11], 4.0, width=2.0)
    block = MeshBlock("8x0e", [11], 4.0).double()
    pos = torch.zeros(2, 3, dtype=torch.float64)
    pos[1, 0] = 1.0
    wire = torch.tensor([[True, False, False]])
    with pytest.raises(ValueError, match="wire"):
        block.mesh_potential(
            pos,
            torch.ones(2, 8, dtype=torch.float64),
            torch.eye(3, dtype=torch.float64)[None] * 5,
            wire,
            torch.zeros(2, dtype=torch.int64),
            torch.tensor([0, 2]),
        )
    with pytest.raises(ValueError, match="kernel"):
        block.mesh_potential(
            pos,
            torch.ones(2, 8, dtype=torch.float64),
            torch.zeros(1, 3, 3, dtype=torch.float64),
            torch.tensor([[False] * 3]),
            torch.zeros(2, dtype=torch.int64),
            torch.tensor([0, 2]),
            kernel="yukawa",
        )


def test_supercell_consistency_at_the_documented_accuracy_setting():
    """``order=6, accuracy=1e-6`` (spacing 0.50 Å at σ = 2 Å): E(2×2×2) = 8 E(cell) to 1e-8 even
    when the supercell mesh is not the cell's mesh (a = 5.3 Å: 12 points, then 22, not 24).

    The default's 9e-7 (a = 5 Å, h = 1 Å, p = 4) is the B-spline aliasing error of the
    narrowest filter Gaussian, ∝ (h/σ)^p: the two meshes sample it differently.
    """
    base = T.make_test_model(atomic_numbers=ELEMENTS, seed=2)
    model = T.perturb_blocks(mace_lr.augment(base, "mesh", order=6, accuracy=1e-6), seed=5)
    block = model.blocks["mesh"]
    rng = np.random.default_rng(1)
    cell = bulk("NaCl", "rocksalt", a=5.3, cubic=True)
    cell.positions += rng.normal(scale=0.1, size=cell.positions.shape)
    counts = []
    for atoms in (cell, cell * (2, 2, 2)):
        n = len(atoms)
        geom = block.mesh_geometry(
            torch.tensor(atoms.positions, dtype=torch.float32),
            torch.tensor(atoms.cell[:], dtype=torch.float32)[None],
            torch.tensor([[True] * 3]),
            torch.zeros(n, dtype=torch.int64),
            torch.tensor([0, n]),
        )
        counts.append(geom[1][0, 0].item())
    assert counts[1] != 2 * counts[0], counts  # the meshes differ
    e1 = _block_energy(model, [cell])[0]
    e8 = _block_energy(model, [cell * (2, 2, 2)])[0]
    assert abs(e1) > 1e-3
    assert abs(e8 - 8 * e1) <= 1e-8 * abs(8 * e1), (e8, 8 * e1)


def test_accuracy_and_padding_options():
    block = MeshBlock("8x0e", [11], 4.0, smearing=2.0, order=6, accuracy=1e-6)
    assert abs(block.spacing - mesh_spacing_for(2.0, 6, 1e-6)) < 1e-12
    assert MeshBlock("8x0e", [11], 4.0, padding=12.0).padding == 12.0
    with pytest.raises(ValueError, match="padding"):
        MeshBlock("8x0e", [11], 4.0, padding=-1.0)
    with pytest.raises(ValueError, match="order in"):
        MeshBlock("8x0e", [11], 4.0, order=3, accuracy=1e-6)


def test_products_readout_option():
    """``products`` adds h ⊙ φ to the energy MLP's input; off (the default) is the (h, φ) readout.

    With the product columns' weights at zero the two readouts are the same function, so
    the products-on block then equals the products-off block with the same other weights;
    non-zero product weights change the energy of two molecules that see each other.
    """
    base = T.make_test_model(atomic_numbers=ELEMENTS, seed=2)
    on = T.perturb_blocks(
        mace_lr.augment(base, {"mesh": {"channels": 2, "hidden": 4, "products": True}}), seed=3
    )
    off = mace_lr.augment(base, {"mesh": {"channels": 2, "hidden": 4}})
    a, b = on.blocks["mesh"], off.blocks["mesh"]
    assert (a.readout[0].in_features, b.readout[0].in_features) == (6, 4)
    assert a.to_config()["products"] is True and b.to_config()["products"] is False
    assert MeshBlock.from_config(b.to_config()).readout[0].in_features == 4
    T.assert_identity_at_init(
        base, mace_lr.augment(base, {"mesh": {"channels": 2, "products": True}}), [molecule("H2O")]
    )
    state = {k: v.clone() for k, v in a.state_dict().items()}
    state["readout.0.weight"] = state["readout.0.weight"][:, :4]
    b.load_state_dict(state)
    pair = molecule("H2O")
    other = molecule("H2O")
    other.positions += (0.0, 0.0, 5.0)
    pair += other
    e_on = _block_energy(on, [pair])[0]
    with torch.no_grad():
        a.readout[0].weight[:, 4:] = 0.0
    e_zeroed = _block_energy(on, [pair])[0]
    assert abs(e_zeroed - _block_energy(off, [pair])[0]) < 1e-12
    assert abs(e_on - e_zeroed) > 1e-8
