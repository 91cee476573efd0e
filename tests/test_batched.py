"""Batched electrostatics: one engine call per batch equals the per-graph engine calls."""

import mace  # noqa: F401
import numpy as np
import pytest
import torch

from mace_lr.electrostatics import _batch, coulomb_potential, coulomb_potential_batch
from mace_lr.electrostatics._batch import _open_chunks, coulomb_potential_batched


def per_graph(positions, charges, cell, pbc, ptr, smearing, accuracy=1e-6, method="auto"):
    """The reference: one engine call per structure (the code LES used before batching)."""
    b = ptr.tolist()
    parts = [
        coulomb_potential(positions[a:c], charges[a:c], cell[g], pbc[g].tolist(), smearing, accuracy, method)
        for g, (a, c) in enumerate(zip(b[:-1], b[1:]))
    ]
    return torch.cat(parts, 0)


def make_batch(kinds, device, dtype=torch.float64, seed=0, channels=None):
    """Graphs of the given kinds: ("open", n), ("bulk", n, L), ("slab", n, L)."""
    rng = np.random.default_rng(seed)
    pos, cells, flags, counts = [], [], [], []
    for kind in kinds:
        n = kind[1]
        if kind[0] == "open":
            pos.append(rng.normal(scale=1.5, size=(n, 3)))
            cells.append(np.zeros((3, 3)))
            flags.append([False] * 3)
        else:
            length = kind[2]
            cell = np.diag([length, length * 1.1, length * 0.95]) + rng.normal(scale=0.1, size=(3, 3))
            if kind[0] == "slab":
                cell[0, 2] = cell[1, 2] = 0.0
                cell[2] = [0.0, 0.0, length]
            pos.append(rng.uniform(size=(n, 3)) @ cell)
            cells.append(cell)
            flags.append([True, True, kind[0] == "bulk"])
        counts.append(n)
    shape = (sum(counts),) if channels is None else (sum(counts), channels)
    q = rng.normal(size=shape)
    ptr = np.concatenate([[0], np.cumsum(counts)])
    t = lambda x: torch.tensor(np.concatenate(x) if isinstance(x, list) else x, dtype=dtype, device=device)  # noqa: E731
    return (
        t(pos),
        torch.tensor(q, dtype=dtype, device=device),
        torch.tensor(np.stack(cells), dtype=dtype, device=device),
        torch.tensor(flags, device=device),
        torch.tensor(ptr, dtype=torch.int64, device=device),
    )


@pytest.mark.parametrize("smearing", [None, 0.8])
@pytest.mark.parametrize("channels", [None, 3])
def test_open_molecules_match_per_graph(device, smearing, channels):
    kinds = [("open", n) for n in (3, 9, 1, 12, 5, 7, 2, 11)]
    pos, q, cell, pbc, ptr = make_batch(kinds, device, channels=channels)
    pos.requires_grad_(True)
    ref = per_graph(pos, q, cell, pbc, ptr, smearing)
    out = coulomb_potential_batch(pos, q, cell, pbc, ptr, smearing=smearing)
    assert out.shape == q.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    (g_ref,) = torch.autograd.grad((q * ref).sum(), pos)
    (g_out,) = torch.autograd.grad((q * out).sum(), pos)
    torch.testing.assert_close(g_out, g_ref, rtol=0, atol=1e-12)


def test_small_chunks_and_oversized_graph(device):
    """Tiny chunk budget: many chunks, and a graph larger than one chunk on its own."""
    kinds = [("open", n) for n in (4, 6, 30, 2, 5)]
    pos, q, cell, pbc, ptr = make_batch(kinds, device, seed=3)
    ref = per_graph(pos, q, cell, pbc, ptr, 0.5)
    out = coulomb_potential_batched(pos, q, cell, pbc, ptr, 0.5, max_elements=100)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    assert _open_chunks([4, 6, 30, 2, 5], 100) == [(0, 2, 6), (2, 3, -1), (3, 5, 5)]


def test_mixed_batch_matches_per_graph(device, monkeypatch):
    """Open, bulk (two copies of one box size, grouped, plus another), slab and empty graphs."""
    kinds = [("open", 5), ("bulk", 8, 6.0), ("bulk", 8, 6.0), ("slab", 6, 7.0), ("open", 0)]
    kinds.append(("bulk", 10, 7.5))
    pos, q, cell, pbc, ptr = make_batch(kinds, device, seed=1)
    # the two equal-size boxes: same cell up to noise below the engine's 0.05 Å grid
    cell[2] = cell[1] * (1.0 + 1e-5)
    pos.requires_grad_(True)
    cell.requires_grad_(True)
    ref = per_graph(pos, q, cell, pbc, ptr, 0.7, accuracy=1e-8)
    groups = []
    original = _batch._ewald_group
    monkeypatch.setattr(_batch, "_ewald_group", lambda p, *a: groups.append(p.shape[0]) or original(p, *a))
    out = coulomb_potential_batch(pos, q, cell, pbc, ptr, smearing=0.7, accuracy=1e-8)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    assert groups == [2]  # the two 6 Å boxes share one reciprocal-space call
    g_ref = torch.autograd.grad((q * ref).sum(), (pos, cell))
    g_out = torch.autograd.grad((q * out).sum(), (pos, cell))
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)


def test_float32(device):
    kinds = [("open", n) for n in (3, 8, 6)] + [("bulk", 6, 5.0)] * 2
    pos, q, cell, pbc, ptr = make_batch(kinds, device, dtype=torch.float32, seed=2)
    ref = per_graph(pos, q, cell, pbc, ptr, 1.0, accuracy=1e-5)
    out = coulomb_potential_batch(pos, q, cell, pbc, ptr, smearing=1.0, accuracy=1e-5)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_bad_shapes(device):
    pos, q, cell, pbc, ptr = make_batch([("open", 3), ("open", 2)], device)
    with pytest.raises(ValueError, match="one row per graph"):
        coulomb_potential_batch(pos, q, cell[:1], pbc, ptr)
    with pytest.raises(ValueError, match="`ptr` must run from 0"):
        coulomb_potential_batch(pos, q, cell, pbc, ptr - 1)
    with pytest.raises(ValueError, match="`charges` must be a tensor"):
        coulomb_potential_batch(pos, q[:4], cell, pbc, ptr)


def _qeq_inputs(device, counts, seed=0):
    rng = np.random.default_rng(seed)
    n = sum(counts)
    t = lambda x: torch.tensor(x, dtype=torch.float64, device=device)  # noqa: E731
    pos = t(rng.normal(scale=1.6, size=(n, 3))).requires_grad_(True)
    chi = t(rng.normal(size=n)).requires_grad_(True)
    hardness = t(rng.uniform(5.0, 10.0, size=n)).requires_grad_(True)
    widths = t(rng.uniform(0.6, 1.2, size=n)).requires_grad_(True)
    ptr = torch.tensor(np.concatenate([[0], np.cumsum(counts)]), device=device)
    total = t(rng.integers(-1, 2, size=len(counts)).astype(float))
    return pos, chi, hardness, widths, ptr, total


@pytest.mark.parametrize("base_smearing", [0.0, 0.85])
def test_qeq_open_batch_matches_per_structure_solves(device, base_smearing):
    """One batched dense solve equals solve_qeq per structure: charges, energies, forces and
    the second derivatives a force loss needs."""
    from mace_lr.electrostatics import solve_qeq, solve_qeq_open_batch

    counts = [3, 7, 1, 5, 12, 4]
    pos, chi, hardness, widths, ptr, total = _qeq_inputs(device, counts)
    out = solve_qeq_open_batch(
        pos, chi, hardness, widths, ptr, total, accuracy=1e-6, base_smearing=base_smearing
    )
    b = ptr.tolist()
    refs = [
        solve_qeq(
            pos[a:c],
            chi[a:c],
            hardness[a:c],
            widths[a:c],
            None,
            (False,) * 3,
            total[g],
            solver="dense",
            accuracy=1e-6,
            base_smearing=base_smearing,
            newton_steps=2,
        )  # fmt: skip
        for g, (a, c) in enumerate(zip(b[:-1], b[1:]))
    ]
    q_ref = torch.cat([r["charges"] for r in refs])
    e_ref = torch.stack([r["energy"] for r in refs])
    torch.testing.assert_close(out["charges"], q_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(out["energy"], e_ref, rtol=0, atol=1e-12)
    mu_ref = torch.stack([r["chemical_potential"][0] for r in refs])
    torch.testing.assert_close(out["chemical_potential"], mu_ref, rtol=0, atol=1e-10)
    inputs = (pos, chi, hardness, widths)
    f_out = torch.autograd.grad(out["energy"].sum(), pos, create_graph=True)[0]
    f_ref = torch.autograd.grad(e_ref.sum(), pos, create_graph=True)[0]
    torch.testing.assert_close(f_out, f_ref, rtol=0, atol=1e-11)
    # a force loss and a charge loss: their parameter gradients (second derivatives)
    weights = torch.linspace(-1.0, 1.0, pos.numel(), dtype=pos.dtype, device=device).reshape(pos.shape)
    loss_out = (weights * f_out).sum() + (out["charges"] ** 2).sum()
    loss_ref = (weights * f_ref).sum() + (q_ref**2).sum()
    for g_out, g_ref in zip(torch.autograd.grad(loss_out, inputs), torch.autograd.grad(loss_ref, inputs)):
        torch.testing.assert_close(g_out, g_ref, rtol=1e-9, atol=1e-10)


def test_qeq_open_batch_errors(device):
    from mace_lr.electrostatics import solve_qeq_open_batch

    pos, chi, hardness, widths, ptr, total = _qeq_inputs(device, [2, 3])
    with pytest.raises(ValueError, match="`total_charge` must have shape"):
        solve_qeq_open_batch(pos, chi, hardness, widths, ptr, total[:1])
    with pytest.raises(ValueError, match="hardness J must be > 0"):
        solve_qeq_open_batch(pos, chi, -hardness, widths, ptr, total)
    with pytest.raises(ValueError, match="`widths` must have shape"):
        solve_qeq_open_batch(pos, chi, hardness, widths[:2], ptr, total)
