"""`mace_lr.nn.NeighbourHarmonics`: learned local harmonics of every degree."""

import mace  # noqa: F401
import numpy as np
import pytest
import torch
from ase import Atoms
from e3nn import o3

from mace_lr._data import atoms_to_batch
from mace_lr.nn import NeighbourHarmonics

R_MAX = 3.0


def _context(atoms):
    batch = atoms_to_batch([atoms], [1, 6], R_MAX)
    return {key: batch[key] for key in ("positions", "edge_index", "shifts", "node_attrs")}


def _irreps(channels, l_max):
    return o3.Irreps("+".join(f"{channels}x{deg}{'eo'[deg % 2]}" for deg in range(l_max + 1)))


def _cluster(seed=0):
    rng = np.random.default_rng(seed)
    return Atoms("CH3CH2", positions=rng.uniform(-1.6, 1.6, size=(7, 3)))


@pytest.mark.parametrize("l_max", [0, 1, 2, 3])
def test_harmonics_rotate_and_invert_with_their_irreps(l_max):
    torch.manual_seed(0)
    layer = NeighbourHarmonics(2, channels=3, l_max=l_max, r_max=R_MAX).double()
    atoms = _cluster()
    ref = layer(_context(atoms)).detach()
    irreps = _irreps(3, l_max)
    assert ref.shape == (len(atoms), irreps.dim) and float(ref.abs().max()) > 1e-2
    torch.manual_seed(3)
    rot = o3.rand_matrix(dtype=torch.float64)
    for matrix in (rot, -rot):  # a proper rotation, and the same with inversion
        moved = atoms.copy()
        moved.positions = atoms.positions @ matrix.numpy().T
        want = ref @ irreps.D_from_matrix(matrix).T
        assert torch.allclose(layer(_context(moved)), want, atol=1e-12)


def test_harmonics_vanish_smoothly_at_the_cutoff():
    torch.manual_seed(1)
    layer = NeighbourHarmonics(2, channels=2, l_max=2, r_max=R_MAX).double()
    direction = np.array([0.3, -0.5, 0.8]) / np.linalg.norm([0.3, -0.5, 0.8])
    values, grads = [], []
    for r in (R_MAX * (1 - 1e-3), 0.5 * R_MAX):
        atoms = Atoms("CH", positions=[[0, 0, 0], r * direction])
        ctx = _context(atoms)
        ctx["positions"] = ctx["positions"].clone().requires_grad_(True)
        out = layer(ctx)
        (grad,) = torch.autograd.grad(out.square().sum(), ctx["positions"])
        values.append(float(out.detach().abs().max()))
        grads.append(float(grad.abs().max()))
    assert values[0] <= 1e-6 * values[1] and grads[0] <= 1e-5 * grads[1], (values, grads)
    # a translation changes nothing; the l = 0 part is the radial sum over neighbours
    atoms = _cluster(2)
    shifted = atoms.copy()
    shifted.positions += [10.0, -3.0, 2.0]
    assert torch.allclose(layer(_context(atoms)), layer(_context(shifted)), atol=1e-12)


def test_harmonics_reject_bad_sizes():
    with pytest.raises(ValueError, match="l_max"):
        NeighbourHarmonics(2, channels=2, l_max=-1, r_max=R_MAX)
    with pytest.raises(ValueError, match="channels"):
        NeighbourHarmonics(2, channels=0, l_max=1, r_max=R_MAX)
