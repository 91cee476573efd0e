"""A multi-channel engine call equals one single-channel call per channel (float64, 1e-12).

The mesh assignment, FFTs and interpolation (P3M), the structure factors (Ewald) and the
real-space and open pair sums all take the charges of every channel at once; this checks
that batching the channels changes nothing but rounding, for potentials, forces and the
gradient with respect to the charges.
"""

import mace  # noqa: F401
import numpy as np
import pytest
import torch

from mace_lr.electrostatics import coulomb_potential_batch
from mace_lr.electrostatics._mesh import assign_to_mesh


def _system(kind, n, seed=0):
    rng = np.random.default_rng(seed)
    if kind == "open":
        pos = rng.normal(scale=2.0, size=(n, 3))
        cell = np.zeros((3, 3))
        pbc = [False] * 3
    else:
        length = (n / 0.05) ** (1 / 3)  # density 0.05 atoms/Å³
        cell = np.diag([length, 1.1 * length, 0.95 * length]) + rng.normal(scale=0.2, size=(3, 3))
        pos = rng.uniform(size=(n, 3)) @ cell
        pbc = [True, True, kind == "bulk"]
        if kind == "slab":
            cell[0, 2] = cell[1, 2] = 0.0
            cell[2] = [0.0, 0.0, length]
            pos = rng.uniform(size=(n, 3)) @ cell
    return pos, cell, pbc


@pytest.mark.parametrize(
    "kind, n, method",
    [("open", 40, "auto"), ("bulk", 60, "ewald"), ("bulk", 300, "p3m"), ("slab", 250, "p3m")],
)
@pytest.mark.parametrize("fft_chunk", [False, True])
def test_channels_equal_single_channel_calls(device, monkeypatch, kind, n, method, fft_chunk):
    channels = 5
    if fft_chunk:  # P3M: one FFT per channel instead of one over all five
        if method != "p3m":
            pytest.skip("only P3M has mesh FFTs")
        from mace_lr.electrostatics import _mesh

        monkeypatch.setattr(_mesh, "MAX_FFT_ELEMENTS", 1)
    pos_np, cell_np, flags = _system(kind, n)
    t = lambda x: torch.tensor(x, dtype=torch.float64, device=device)  # noqa: E731
    cell = t(cell_np)[None]
    pbc = torch.tensor([flags], device=device)
    ptr = torch.tensor([0, n], device=device)
    rng = np.random.default_rng(1)
    q_np = rng.normal(size=(n, channels))
    q_np[:, 2] *= 0.0  # a channel of zeros
    q_np[:, 3] += 0.3  # a net-charged channel (neutralising background when periodic)
    kw = dict(smearing=0.9, accuracy=1e-5, method=method)

    pos_m = t(pos_np).requires_grad_(True)
    q_m = t(q_np).requires_grad_(True)
    phi_m = coulomb_potential_batch(pos_m, q_m, cell, pbc, ptr, **kw)
    energy_m = (q_m * phi_m).sum()
    force_m, dq_m = torch.autograd.grad(energy_m, (pos_m, q_m))

    pos_s = t(pos_np).requires_grad_(True)
    q_s = t(q_np).requires_grad_(True)
    cols = [coulomb_potential_batch(pos_s, q_s[:, c : c + 1], cell, pbc, ptr, **kw) for c in range(channels)]
    phi_s = torch.cat(cols, 1)
    energy_s = (q_s * phi_s).sum()
    force_s, dq_s = torch.autograd.grad(energy_s, (pos_s, q_s))

    scale = float(phi_s.detach().abs().max())
    assert scale > 1.0
    torch.testing.assert_close(phi_m, phi_s, rtol=0, atol=1e-12 * scale)
    assert float((phi_m[:, 2]).detach().abs().max()) == 0.0
    torch.testing.assert_close(force_m, force_s, rtol=0, atol=1e-12 * float(force_s.abs().max()))
    torch.testing.assert_close(dq_m, dq_s, rtol=0, atol=1e-12 * float(dq_s.abs().max()))
    # one-dimensional charges are the one-channel case
    phi_1 = coulomb_potential_batch(pos_s, q_s[:, 0], cell, pbc, ptr, **kw)
    torch.testing.assert_close(phi_1, phi_s[:, 0], rtol=0, atol=1e-12 * scale)


def test_assign_to_mesh_conserves_charge_per_channel(device, monkeypatch):
    """B-spline weights sum to one: each channel's mesh total is its total charge, chunked or not."""
    from mace_lr.electrostatics import _mesh

    rng = np.random.default_rng(2)
    n, nodes, sizes = 30, 27, (6, 5, 4)
    raw = torch.tensor(rng.uniform(size=(nodes, n)), dtype=torch.float64, device=device)
    weights = raw / raw.sum(0, keepdim=True)
    flat = torch.tensor(rng.integers(0, 6 * 5 * 4, size=(nodes, n)), device=device)
    q = torch.tensor(rng.normal(size=(n, 3)), dtype=torch.float64, device=device)
    whole = assign_to_mesh(q, weights, flat, sizes)
    assert whole.shape == (6 * 5 * 4, 3)
    torch.testing.assert_close(whole.sum(0), q.sum(0), rtol=0, atol=1e-12)
    monkeypatch.setattr(_mesh, "MAX_ASSIGN_ELEMENTS", 2 * n * 3)  # chunks of 2 nodes
    torch.testing.assert_close(assign_to_mesh(q, weights, flat, sizes), whole, rtol=0, atol=1e-13)


def test_symmetric_filter_matches_torch_pme_with_first_and_second_derivatives(device):
    """The P3M filter's own backward (the same symmetric map) equals autograd through torch-pme."""
    from mace_lr.electrostatics._mesh import MeshKSpace, apply_filter

    cell = torch.tensor(
        [[6.0, 0.3, 0.0], [0.2, 5.0, 0.1], [0.0, -0.4, 4.5]], dtype=torch.float64, device=device
    )
    calc = MeshKSpace(split=1.2, mesh_spacing=1.0).to(device=device, dtype=torch.float64)
    ns = calc.mesh_shape(cell)
    calc.kspace_filter.update(cell, ns)
    sizes = tuple(int(n) for n in ns.tolist())
    gen = torch.Generator(device="cpu").manual_seed(3)
    mesh = torch.randn((2,) + sizes, generator=gen, dtype=torch.float64).to(device).requires_grad_(True)
    ours = apply_filter(calc.kspace_filter, mesh)
    theirs = calc.kspace_filter.forward(mesh)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12 * float(theirs.detach().abs().max()))
    probe = torch.randn(ours.shape, generator=gen, dtype=torch.float64).to(device)
    (g_ours,) = torch.autograd.grad((ours * probe).sum(), mesh, create_graph=True)
    (g_theirs,) = torch.autograd.grad((theirs * probe).sum(), mesh, create_graph=True)
    torch.testing.assert_close(g_ours, g_theirs, rtol=0, atol=1e-12 * float(g_theirs.detach().abs().max()))
    # the map is linear: the gradient does not depend on the mesh, and the backward of the
    # backward (force training) is checked numerically by gradgradcheck
    (h_ours,) = torch.autograd.grad((g_ours * mesh).sum(), mesh)
    (h_theirs,) = torch.autograd.grad((g_theirs * mesh).sum(), mesh)
    torch.testing.assert_close(h_ours, h_theirs, rtol=0, atol=1e-12 * float(h_theirs.abs().max()))
    small = mesh.detach()[:1].clone().requires_grad_(True)
    assert torch.autograd.gradgradcheck(lambda m: apply_filter(calc.kspace_filter, m), (small,))
