"""The shared B-spline mesh (``mace_lr.nn.mesh_convolution``): accuracy law and exact cases."""

import itertools
import math

import mace  # noqa: F401
import numpy as np
import pytest
import torch

import mace_lr.nn
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


# ---------------------------------------------------------------------------------------
# The eager path (CSR products in autograd Functions) against a dense reference


def _systems(dtype=torch.float64):
    """Bulk (triclinic), open, slab, a batch of three graphs (two mesh shapes, one open)
    and a cell whose mesh counts are below p (an atom's stencil repeats mesh points).
    """
    g = torch.Generator().manual_seed(3)

    def rand(*shape):
        return torch.rand(*shape, generator=g, dtype=dtype)

    tri = torch.tensor([[9.0, 0.0, 0.0], [1.0, 8.6, 0.0], [0.5, -0.7, 9.5]], dtype=dtype)
    slab = torch.tensor([[7.0, 0.0, 0.0], [0.5, 6.5, 0.0], [0.0, 0.0, 30.0]], dtype=dtype)
    cube = torch.diag(torch.tensor([8.0, 7.0, 9.0], dtype=dtype))
    tiny = torch.diag(torch.tensor([3.0, 2.5, 4.0], dtype=dtype))
    zero = torch.zeros(3, 3, dtype=dtype)
    yes, no = [True] * 3, [False] * 3
    return {
        "bulk": ([rand(14, 3) @ tri], [tri], [yes]),
        "open": ([4.0 * rand(9, 3)], [zero], [no]),
        "slab": ([rand(10, 3) * torch.tensor([7.0, 6.5, 5.0], dtype=dtype)], [slab], [[True, True, False]]),
        "batch": (
            [rand(8, 3) @ cube, 3.0 * rand(5, 3), rand(6, 3) @ cube],
            [cube, zero, cube],
            [yes, no, yes],
        ),
        "tiny": ([rand(4, 3) @ tiny], [tiny], [yes]),
    }


def _inputs(name, nchan=3, dtype=torch.float64):
    pos_list, cells, pbc = _systems(dtype)[name]
    sizes = torch.tensor([p.shape[0] for p in pos_list])
    g = torch.Generator().manual_seed(4)
    n = int(sizes.sum())
    return dict(
        positions=torch.cat(pos_list),
        values=torch.randn(n, nchan, generator=g, dtype=dtype),
        cell=torch.stack(cells),
        pbc=torch.tensor(pbc),
        batch=torch.repeat_interleave(torch.arange(len(pos_list)), sizes),
        ptr=torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(sizes, 0)]),
        widths=torch.tensor([1.0, 1.6], dtype=dtype),
        amplitudes=torch.randn(2, nchan, generator=g, dtype=dtype),
    )


def _dense_reference(
    positions, values, cell, pbc, batch, ptr, widths, amplitudes, spacing, order, padding, coulomb
):
    """mesh_convolution written the plain way: a dense [n_atoms, mesh] interpolation
    matrix W (accumulated per stencil point), M = Wᵀh, one FFT per graph, φ = W M.
    """
    from mace_lr._gridding import _kspace_filter, mesh_geometry

    box, counts, x = mesh_geometry(positions, cell, pbc, batch, ptr, spacing, padding)
    base, w = mace_lr.nn.bspline_weights(x, order)
    n_atoms = positions.shape[0]
    sizes = [int(c.prod()) for c in counts]
    offsets = [sum(sizes[:g]) for g in range(len(sizes))]
    rows, cols, vals = [], [], []
    for i in range(n_atoms):
        gi = int(batch[i])
        n = counts[gi].tolist()
        for a, b, c in itertools.product(range(order), repeat=3):
            k0, k1, k2 = [int(base[i, d] - s) % n[d] for d, s in enumerate((a, b, c))]
            rows.append(i)
            cols.append(offsets[gi] + (k0 * n[1] + k1) * n[2] + k2)
            vals.append(w[i, 0, a] * w[i, 1, b] * w[i, 2, c])
    matrix = torch.zeros(n_atoms, sum(sizes), dtype=positions.dtype)
    matrix = matrix.index_put((torch.tensor(rows), torch.tensor(cols)), torch.stack(vals), accumulate=True)
    mesh = matrix.t() @ values
    field = []
    for gi, (size, off) in enumerate(zip(sizes, offsets)):
        n = counts[gi].tolist()
        rho = torch.fft.rfftn(mesh[off : off + size].t().reshape(-1, *n), dim=[1, 2, 3])
        filt = _kspace_filter(box[gi : gi + 1], n[0], n[1], n[2], widths, amplitudes, order, coulomb)[0]
        volume = torch.linalg.det(box[gi]).abs()
        part = torch.fft.irfftn(rho * filt, s=n, dim=[1, 2, 3]) * (size / volume)
        field.append(part.reshape(-1, size).t())
    return matrix @ torch.cat(field)


def _derivatives(fn, inputs, second):
    """φ, the gradients of a scalar of φ, and (``second``) those of a scalar of the first
    gradients (force training differentiates forces and stress once more; stress only
    where every graph is periodic: the second cell derivative of an open graph's zero cell
    is not defined).
    """
    names = ["positions", "values", "cell", "widths", "amplitudes"]
    args = {k: v.clone().requires_grad_(k in names) for k, v in inputs.items()}
    phi = fn(**args)
    energy = (phi * torch.sin(args["values"])).sum() + 0.1 * (phi**2).sum()
    grads = torch.autograd.grad(energy, [args[k] for k in names], create_graph=second)
    out = [phi] + list(grads)
    if second:
        loss = (grads[0] ** 2).sum()
        if bool(inputs["pbc"].any(dim=1).all()):
            loss = loss + (grads[2] ** 2).sum()
        out += list(torch.autograd.grad(loss, [args[k] for k in names], allow_unused=True))
    return [torch.zeros(()) if o is None else o.detach() for o in out]


_DENSE_CASES = [(name, 4, 0.6, False) for name in ("bulk", "open", "slab", "batch", "tiny")]
_DENSE_CASES += [(name, 6, 0.9, False) for name in ("bulk", "open", "slab", "batch", "tiny")]
_DENSE_CASES += [("bulk", 5, 0.8, True)]  # the Coulomb filter (periodic cells)


@pytest.mark.parametrize("name, order, spacing, coulomb", _DENSE_CASES)
def test_mesh_convolution_matches_dense_reference(name, order, spacing, coulomb):
    """Values, gradients (positions, cell, values, widths, amplitudes) and the second
    derivatives of force training equal the dense-matrix computation to rounding.
    """
    inputs = _inputs(name)
    conf = dict(spacing=spacing, order=order, padding=1.0, coulomb=coulomb)
    second = name != "batch" or order == 4  # the dense reference is slow on the batch

    def fast(**kw):
        return mesh_convolution(**kw, **conf)[0]

    def dense(**kw):
        return _dense_reference(**kw, **conf)

    got, ref = _derivatives(fast, inputs, second), _derivatives(dense, inputs, second)
    for a, b in zip(got, ref):
        assert bool(torch.isfinite(b).all())
        scale = float(b.abs().max()) if b.numel() else 0.0
        torch.testing.assert_close(a, b, rtol=0.0, atol=1e-12 * max(scale, 1e-30))


def test_mesh_convolution_scripted_index_path_agrees():
    """TorchScript runs the index_add/index_select stencil; it equals the eager CSR path."""
    scripted = torch.jit.script(mesh_convolution)
    for name in ("bulk", "batch", "tiny"):
        inputs = _inputs(name)
        args = (0.7, 5, 1.0, False)
        a = mesh_convolution(*inputs.values(), *args)[0]
        b = scripted(*inputs.values(), *args)[0]
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12 * float(a.abs().max()))


def test_stencil_functions_gradcheck():
    """The assignment, interpolation and stencil-product Functions, and the paired
    assignment/interpolation of one convolution: first and second derivatives against
    finite differences (gradcheck / gradgradcheck).
    """
    from mace_lr._gridding import _Assign, _AssignPaired, _Interpolate, _InterpolatePaired, _Pair, _Stencil

    g = torch.Generator().manual_seed(5)
    n_atoms, points, total, nchan = 5, 8, 11, 2
    for repeats in (False, True):
        if repeats:
            flat = torch.randint(0, total, (n_atoms, points), generator=g)
        else:
            flat = torch.stack([torch.randperm(total, generator=g)[:points] for _ in range(n_atoms)])
        stencil = _Stencil(flat, total, repeats)

        def rnd(*shape):
            return torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)

        w, h, m = rnd(n_atoms, points), rnd(n_atoms, nchan), rnd(total, nchan)
        mixing = torch.randn(total, total, generator=g, dtype=torch.float64)

        def paired(w, h):
            # assignment, a linear mesh operation, interpolation with the same weights
            mesh, field_slot, grad_slot = _AssignPaired.apply(w, h, stencil)
            return _InterpolatePaired.apply(w, torch.tanh(mixing @ mesh), field_slot, grad_slot, stencil)

        cases = [
            (lambda w, h: _Assign.apply(w, h, stencil), (w, h)),
            (lambda w, m: _Interpolate.apply(w, m, stencil), (w, m)),
            (lambda m, h: _Pair.apply(m, h, stencil), (m, h)),
            (paired, (w, h)),
        ]
        for fn, args in cases:
            assert torch.autograd.gradcheck(fn, args)
            assert torch.autograd.gradgradcheck(fn, args)
