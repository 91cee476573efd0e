"""The ``attention`` block: kernel against direct sums, invariances, supercell and size consistency."""

import itertools
import math

import numpy as np
import pytest
import torch
from ase.build import bulk
from mace_lr.plugins.attention import AttentionBlock

import mace_lr
from mace_lr import testing as T

IRREPS = "6x0e+2x1o"


def make_block(seed: int = 0, **config) -> AttentionBlock:
    """A block with random non-zero weights everywhere (the output layer included)."""
    torch.manual_seed(seed)
    block = AttentionBlock(IRREPS, [1, 6], 4.5, **config).double()
    with torch.no_grad():
        for p in block.mlp.parameters():
            p.copy_(torch.randn_like(p))
    return block


def make_ctx(positions, feats, cell=None, pbc=(False, False, False), sizes=None):
    positions = torch.as_tensor(np.asarray(positions), dtype=torch.float64)
    sizes = sizes or [positions.shape[0]]
    g = len(sizes)
    cell = (
        torch.zeros(g, 3, 3, dtype=torch.float64) if cell is None else torch.as_tensor(cell).reshape(g, 3, 3)
    )
    return {
        "positions": positions,
        "cell": cell.double(),
        "pbc": torch.tensor([list(pbc)] * g),
        "batch": torch.repeat_interleave(torch.arange(g), torch.tensor(sizes)),
        "ptr": torch.tensor([0] + list(np.cumsum(sizes))),
        "node_feats": torch.as_tensor(feats, dtype=torch.float64),
    }


def direct_attention(block: AttentionBlock, ctx, images) -> torch.Tensor:
    """O(N²) real-space reference: Σ_j Σ_n exp(−|r_ij + n|²/2σ²) q_i·k_j v_j."""
    h = ctx["node_feats"][:, block.scalar_index]
    n, hd = h.shape[0], block.heads
    q = block.query(h).view(n, hd, -1)
    k = block.key(h).view(n, hd, -1)
    v = block.value(h).view(n, hd, -1)
    sigma = block.sigmas()
    r = ctx["positions"]
    d = r[:, None, :] - r[None, :, :]  # [N, N, 3]
    kern = torch.zeros(n, n, hd, dtype=torch.float64)
    for shift in images:
        dist2 = ((d + shift) ** 2).sum(-1)
        kern = kern + torch.exp(-dist2[:, :, None] / (2 * sigma**2))
    qk = torch.einsum("ihd,jhd->ijh", q, k)
    return block.feature_scale * torch.einsum("ijh,ijh,jhc->ihc", kern, qk, v)


def random_molecule(rng, n=6, extent=5.0):
    return rng.uniform(-extent / 2, extent / 2, size=(n, 3))


def test_attention_block_contract():
    T.run_block_contract("attention")


def test_open_kernel_matches_direct_pair_sum():
    rng = np.random.default_rng(0)
    pos = random_molecule(rng)
    feats = rng.normal(size=(6, 12))
    block = make_block(sigma_min=2.0, sigma_max=4.0, accuracy=1e-10)
    ctx = make_ctx(pos, feats)
    ref = direct_attention(block, ctx, [torch.zeros(3, dtype=torch.float64)])
    got = block.attend(ctx)
    assert ref.abs().max() > 1e-2
    torch.testing.assert_close(got, ref, rtol=1e-8, atol=1e-9)


def test_periodic_kernel_matches_lattice_sum():
    rng = np.random.default_rng(1)
    cell = np.array([[6.0, 0.0, 0.0], [1.5, 5.5, 0.0], [0.7, -0.9, 6.5]])
    frac = rng.uniform(size=(5, 3))
    pos = frac @ cell
    feats = rng.normal(size=(5, 12))
    block = make_block(sigma_min=1.5, sigma_max=2.5, accuracy=1e-12)
    ctx = make_ctx(pos, feats, cell=cell, pbc=(True, True, True))
    cell_t = torch.tensor(cell)
    images = [
        torch.tensor(n, dtype=torch.float64) @ cell_t for n in itertools.product(range(-4, 5), repeat=3)
    ]
    ref = direct_attention(block, ctx, images)
    torch.testing.assert_close(block.attend(ctx), ref, rtol=1e-8, atol=1e-9)


def test_supercell_energy_is_eight_times_the_cell():
    base = T.make_test_model()
    model = T.perturb_blocks(mace_lr.augment(base, "attention"))
    atoms = T.reference_systems()["periodic"]
    e1 = T.evaluate(model, [atoms])["lr_energy"][0].item()
    e8 = T.evaluate(model, [atoms * (2, 2, 2)])["lr_energy"][0].item()
    assert abs(e1) > 1e-3  # the block is on, so the test can fail
    assert abs(e8 - 8 * e1) <= 1e-8 * abs(8 * e1), f"E(2x2x2) - 8 E(cell) = {e8 - 8 * e1:.3g} eV"


def test_size_consistency_two_molecules_far_apart():
    """Two copies 50 Å apart give twice the energy of one, up to the kernel tail e^{-D²/2σ_max²}."""
    rng = np.random.default_rng(2)
    pos = random_molecule(rng)
    feats = rng.normal(size=(6, 12))
    block = make_block(sigma_min=2.0, sigma_max=5.0, accuracy=1e-10)  # images below 1e-10
    e1 = block(make_ctx(pos, feats))["energy"].item()
    for gap, expect_coupled in ((50.0, False), (8.0, True)):
        two = np.concatenate([pos, pos + [gap, 0.0, 0.0]])
        e2 = block(make_ctx(two, np.concatenate([feats, feats])))["energy"].item()
        tail = math.exp(-((gap - 5.0 * math.sqrt(3)) ** 2) / (2 * 5.0**2))  # closest atoms
        if expect_coupled:
            assert abs(e2 - 2 * e1) > 1e-3 * abs(e1), "copies 8 Å apart should interact"
        else:
            assert abs(e2 - 2 * e1) <= max(1e-8, 10 * tail) * abs(2 * e1), f"mixing {e2 - 2 * e1:.3g} eV"


def test_rotation_error_of_an_elongated_molecule_is_bounded_by_the_accuracy():
    rng = np.random.default_rng(3)
    pos = np.stack([np.zeros(14), np.zeros(14), 1.28 * np.arange(14)], axis=1) + rng.normal(
        scale=0.1, size=(14, 3)
    )
    feats = rng.normal(size=(14, 12))
    for accuracy in (1e-4, 1e-8):
        block = make_block(accuracy=accuracy)
        e0 = block(make_ctx(pos, feats))["energy"].item()
        worst = 0.0
        for seed in range(3):
            rot = T._random_rotation(seed)
            e = block(make_ctx(pos @ rot.T + [3.0, -1.0, 2.0], feats))["energy"].item()
            worst = max(worst, abs(e - e0) / abs(e0))
        assert worst <= 10 * accuracy, f"relative rotation error {worst:.3g} at accuracy {accuracy}"


def test_batch_matches_single_graphs_with_mixed_boundaries():
    rng = np.random.default_rng(4)
    cell = np.diag([5.0, 5.5, 6.0])
    pos_a, pos_b = rng.uniform(size=(4, 3)) @ cell, random_molecule(rng, n=3)
    feats = rng.normal(size=(7, 12))
    block = make_block()
    single = [
        block(make_ctx(pos_a, feats[:4], cell=cell, pbc=(True, True, True)))["energy"],
        block(make_ctx(pos_b, feats[4:]))["energy"],
    ]
    # one graph periodic, the other open: pbc per graph
    ctx = make_ctx(
        np.concatenate([pos_a, pos_b]), feats, cell=np.stack([cell, np.zeros((3, 3))]), sizes=[4, 3]
    )
    ctx["pbc"] = torch.tensor([[True] * 3, [False] * 3])
    batched = block(ctx)["energy"]
    torch.testing.assert_close(batched, torch.cat(single), rtol=1e-12, atol=1e-12)


def test_zero_energy_at_initialisation():
    rng = np.random.default_rng(5)
    block = AttentionBlock(IRREPS, [1, 6], 4.5).double()
    out = block(make_ctx(random_molecule(rng), rng.normal(size=(6, 12))))
    assert out["energy"].abs().max().item() == 0.0


def test_bad_input_and_options_are_rejected():
    rng = np.random.default_rng(6)
    block = make_block()
    with pytest.raises(ValueError, match="exactly one periodic direction"):
        block(
            make_ctx(
                random_molecule(rng), rng.normal(size=(6, 12)), cell=np.eye(3) * 5, pbc=(True, False, False)
            )
        )
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        AttentionBlock(IRREPS, [1], 4.5, sigma_min=5.0, sigma_max=3.0)
    with pytest.raises(ValueError, match="sigma_init"):
        AttentionBlock(IRREPS, [1], 4.5, sigma_init=[20.0, 5.0])
    with pytest.raises(TypeError, match="unknown attention option"):
        AttentionBlock(IRREPS, [1], 4.5, sigma=3.0)
    with pytest.raises(ValueError, match="no invariant"):
        AttentionBlock("2x1o", [1], 4.5)


def test_slab_supercell_in_plane():
    atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
    atoms.positions += np.random.default_rng(7).normal(scale=0.1, size=atoms.positions.shape)
    atoms.cell[2] = [0.0, 0.0, 20.0]
    atoms.pbc = [True, True, False]
    model = T.perturb_blocks(mace_lr.augment(T.make_test_model(), "attention"))
    e1 = T.evaluate(model, [atoms])["lr_energy"][0].item()
    e4 = T.evaluate(model, [atoms * (2, 2, 1)])["lr_energy"][0].item()
    assert abs(e1) > 1e-3
    assert abs(e4 - 4 * e1) <= 1e-8 * abs(4 * e1), f"E(2x2x1 slab) - 4 E(slab) = {e4 - 4 * e1:.3g} eV"


# ---------------------------------------------------------------- mesh path (O(N log N))


@pytest.mark.parametrize("pbc", [(True, True, True), (False, False, False), (True, True, False)])
def test_mesh_path_matches_direct_sum(pbc):
    """B-spline mesh + FFT and the reciprocal-vector sum agree to the requested accuracy."""
    rng = np.random.default_rng(8)
    cell = np.array([[9.0, 0.0, 0.0], [1.5, 8.5, 0.0], [0.7, -0.9, 10.5]])
    pos = rng.uniform(size=(16, 3)) @ cell
    feats = rng.normal(size=(16, 12))
    ctx = make_ctx(pos, feats, cell=cell if any(pbc) else None, pbc=pbc)
    for accuracy in (1e-4, 1e-6):
        direct = make_block(accuracy=accuracy, method="direct")
        mesh = make_block(accuracy=accuracy, method="mesh")
        a_d, a_m = direct.attend(ctx), mesh.attend(ctx)
        err = ((a_d - a_m).abs().max() / a_d.abs().max()).item()
        assert err <= accuracy, (accuracy, err)
        e_d, e_m = direct(ctx)["energy"].item(), mesh(ctx)["energy"].item()
        assert abs(e_d - e_m) <= accuracy * abs(e_d), (accuracy, e_d, e_m)


def test_auto_picks_the_mesh_for_large_cells_only(monkeypatch):
    """Per graph, by the cost model; a batch mixing both paths equals the graphs one by one."""
    import mace_lr.plugins.attention as attention_module

    rng = np.random.default_rng(9)
    small_cell, big_cell = np.diag([6.0, 6.5, 7.0]), np.diag([12.0, 12.5, 13.0])
    pos_s, pos_b = rng.uniform(size=(4, 3)) @ small_cell, rng.uniform(size=(12, 3)) @ big_cell
    feats = rng.normal(size=(16, 12))
    block = make_block(method="auto")
    # the direct cost n·K of the two graphs; a mesh overhead between them splits the batch
    k_small, k_big = (
        block.plan(
            torch.tensor(p), torch.tensor(c)[None], torch.tensor([[True] * 3]), torch.tensor([0, len(p)])
        )[1].shape[1]
        for p, c in ((pos_s, small_cell), (pos_b, big_cell))
    )
    threshold = math.sqrt(4 * k_small * 12 * k_big)
    monkeypatch.setattr(attention_module, "_STENCIL_COST", 0.0)
    monkeypatch.setattr(attention_module, "_FFT_COST", 0.0)
    monkeypatch.setattr(attention_module, "_MESH_OVERHEAD", threshold)
    ctx = make_ctx(
        np.concatenate([pos_s, pos_b]),
        feats,
        cell=np.stack([small_cell, big_cell]),
        pbc=(True,) * 3,
        sizes=[4, 12],
    )
    use_mesh = block.plan(ctx["positions"], ctx["cell"], ctx["pbc"], ctx["ptr"])[0]
    assert use_mesh.tolist() == [False, True]
    batched = block(ctx)["energy"]
    single = [
        block(make_ctx(pos_s, feats[:4], cell=small_cell, pbc=(True,) * 3))["energy"],
        make_block(method="mesh")(make_ctx(pos_b, feats[4:], cell=big_cell, pbc=(True,) * 3))["energy"],
    ]
    torch.testing.assert_close(batched, torch.cat(single), rtol=1e-12, atol=1e-12)


def test_mesh_path_supercell_and_finite_differences():
    """Mesh path: E(2×2×2) = 8 E(cell) to 1e-8 at the default accuracy (1e-6), and forces and
    stress are the exact gradients of its energy."""
    base = T.make_test_model()
    model = T.perturb_blocks(mace_lr.augment(base, "attention", method="mesh"))
    atoms = T.reference_systems()["periodic"]
    e1 = T.evaluate(model, [atoms])["lr_energy"][0].item()
    e8 = T.evaluate(model, [atoms * (2, 2, 2)])["lr_energy"][0].item()
    assert abs(e1) > 1e-3
    assert abs(e8 - 8 * e1) <= 1e-8 * abs(8 * e1), f"E(2x2x2) - 8 E(cell) = {e8 - 8 * e1:.3g} eV"
    T.assert_forces_match_finite_differences(model, atoms, max_components=6)
    T.assert_stress_matches_finite_differences(model, atoms)


@pytest.mark.slow
def test_attention_block_contract_mesh_path():
    T.run_block_contract("attention", config={"method": "mesh"})
