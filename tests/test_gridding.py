"""The shared B-spline mesh (``mace_lr.nn.mesh_convolution``): accuracy law and exact cases."""

import itertools
import math

import mace  # noqa: F401
import numpy as np
import pytest
import torch

from mace_lr.nn import mesh_convolution, mesh_spacing_for


def _periodic_case(n=12, seed=0):
    rng = np.random.default_rng(seed)
    cell = torch.tensor([[9.0, 0.0, 0.0], [1.0, 8.6, 0.0], [0.5, -0.7, 9.5]], dtype=torch.float64)
    pos = torch.tensor(rng.uniform(size=(n, 3)), dtype=torch.float64) @ cell
    vals = torch.tensor(rng.normal(size=(n, 2)), dtype=torch.float64)
    return pos, vals, cell


def _lattice_gaussian_sum(pos, vals, cell, sigma):
    """Σ_j Σ_n exp(−|r_ij + n|²/2σ²) h_j by direct summation over images."""
    d = pos[:, None, :] - pos[None, :, :]
    kern = torch.zeros(d.shape[:2], dtype=torch.float64)
    for m in itertools.product(range(-3, 4), repeat=3):
        shift = torch.tensor(m, dtype=torch.float64) @ cell
        kern = kern + torch.exp(-((d + shift) ** 2).sum(-1) / (2 * sigma**2))
    return kern @ vals


@pytest.mark.parametrize("order", [4, 6, 8])
def test_spacing_for_accuracy_meets_it(order):
    """At h = mesh_spacing_for(σ, p, ε) the field error is below ε (relative to its maximum)."""
    pos, vals, cell = _periodic_case()
    sigma = 2.0
    ref = _lattice_gaussian_sum(pos, vals, cell, sigma)
    n = pos.shape[0]
    errors = []
    for accuracy in (1e-4, 1e-6):
        h = mesh_spacing_for(sigma, order, accuracy)
        phi, _ = mesh_convolution(
            pos,
            vals,
            cell[None],
            torch.tensor([[True] * 3]),
            torch.zeros(n, dtype=torch.int64),
            torch.tensor([0, n]),
            torch.tensor([sigma], dtype=torch.float64),
            torch.tensor([[(2 * math.pi * sigma**2) ** 1.5]], dtype=torch.float64),
            h,
            order,
            0.0,
        )
        errors.append(float((phi - ref).abs().max() / ref.abs().max()))
        assert errors[-1] <= accuracy, (order, accuracy, errors[-1])
    assert errors[1] < 0.1 * errors[0]  # and it falls as the mesh refines


def test_commensurate_supercell_mesh_is_exact():
    """A 2×1×1 supercell of a cell whose lengths are even multiples of h: same mesh points."""
    rng = np.random.default_rng(1)
    cell = torch.diag(torch.tensor([6.0, 5.0, 7.0], dtype=torch.float64))
    pos = torch.tensor(rng.uniform(size=(5, 3)), dtype=torch.float64) @ cell
    vals = torch.tensor(rng.normal(size=(5, 3)), dtype=torch.float64)
    big_pos = torch.cat([pos, pos + cell[0]])
    big_cell = cell.clone()
    big_cell[0] *= 2
    widths = torch.tensor([1.0, 2.0], dtype=torch.float64)
    amps = torch.tensor(rng.normal(size=(2, 3)), dtype=torch.float64)

    def run(p, v, c):
        n = p.shape[0]
        pbc = torch.tensor([[True] * 3])
        batch, ptr = torch.zeros(n, dtype=torch.int64), torch.tensor([0, n])
        return mesh_convolution(p, v, c[None], pbc, batch, ptr, widths, amps, 0.5, 4, 0.0)[0]

    small, big = run(pos, vals, cell), run(big_pos, torch.cat([vals, vals]), big_cell)
    torch.testing.assert_close(big[:5], small, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(big[5:], small, rtol=1e-12, atol=1e-12)


def test_spacing_for_rejects_bad_requests():
    with pytest.raises(ValueError, match="accuracy must be in"):
        mesh_spacing_for(2.0, 6, 0.0)
    with pytest.raises(ValueError, match="order in"):
        mesh_spacing_for(2.0, 3, 1e-6)
