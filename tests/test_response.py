"""Polarization modulo the quantum: minimum image, loss invariance, training across a branch jump."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import bulk

from mace_lr import augment
from mace_lr._data import atoms_to_batch
from mace_lr.response import polarization_loss, polarization_minimum_image, polarization_quantum
from mace_lr.testing import make_test_model

FORMAL = {11: 1.0, 17: -1.0}


def _t(x):
    return torch.tensor(np.asarray(x), dtype=torch.float64)


def _ionic_polarization(atoms) -> np.ndarray:
    z = np.array([FORMAL[int(n)] for n in atoms.numbers])
    return (z[:, None] * atoms.positions).sum(0) / abs(atoms.get_volume())


def _cells():
    rng = np.random.default_rng(3)
    cubic = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
    tric = bulk("NaCl", "rocksalt", a=5.64) * (2, 1, 1)
    tric.cell[2] += [0.7, -0.4, 0.0]
    slab = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
    slab.cell[2] = [0.0, 0.0, 18.0]
    slab.pbc = [True, True, False]
    out = []
    for a in (cubic, tric, slab):
        a = a.copy()
        a.positions += rng.normal(scale=0.2, size=a.positions.shape)
        out.append(a)
    return out


@pytest.mark.parametrize("which", [0, 1, 2])
def test_loss_unchanged_when_an_atom_moves_by_a_lattice_vector(which):
    atoms = _cells()[which]
    pred = _t(_ionic_polarization(atoms))[None] + _t([[1e-3, -2e-3, 5e-4]])
    cell, pbc = _t(np.asarray(atoms.cell))[None], torch.tensor(atoms.pbc)[None]
    ref0 = _t(_ionic_polarization(atoms))[None]
    base = float(polarization_loss(pred, ref0, cell, pbc))
    assert base > 0
    periodic = [k for k in range(3) if atoms.pbc[k]]
    for i in range(len(atoms)):
        for k in periodic:
            for n in (1, -2):
                moved = atoms.copy()
                moved.positions[i] += n * atoms.cell[k]
                ref = _t(_ionic_polarization(moved))[None]
                assert float(((ref - ref0) ** 2).sum()) > 1e-6  # the plain loss does change
                assert (
                    abs(float(polarization_loss(pred, ref, cell, pbc)) - base)
                    < 1e-12 * max(1.0, base) + 1e-15
                )


def test_minimum_image_is_the_shortest_representative():
    rng = np.random.default_rng(0)
    for atoms in _cells():
        cell, pbc = _t(np.asarray(atoms.cell))[None], torch.tensor(atoms.pbc)[None]
        quantum = polarization_quantum(cell)[0]
        for _ in range(20):
            delta = _t(rng.normal(scale=0.2, size=(1, 3)))
            wrapped = polarization_minimum_image(delta, cell, pbc)[0]
            # differs from delta by an integer combination of the periodic quanta
            periodic = [k for k in range(3) if atoms.pbc[k]]
            coef = torch.linalg.lstsq(quantum[periodic].T, (delta[0] - wrapped)[:, None]).solution[:, 0]
            assert torch.allclose(coef, torch.round(coef), atol=1e-9)
            assert torch.allclose(coef @ quantum[periodic], delta[0] - wrapped, atol=1e-12)
            # and no neighbour image is shorter
            for k in periodic:
                for s in (1.0, -1.0):
                    assert float((wrapped + s * quantum[k]).norm()) >= float(wrapped.norm()) - 1e-12
            if not atoms.pbc[2]:  # no quantum along the slab normal
                assert abs(float(wrapped[2] - delta[0, 2])) < 1e-12


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="shape"):
        polarization_minimum_image(torch.zeros(3), torch.eye(3)[None])
    with pytest.raises(ValueError, match="cells"):
        polarization_minimum_image(torch.zeros(2, 3), torch.eye(3)[None])


def _branch_jump_data(n: int = 12, seed: int = 5):
    """Rattled NaCl cells whose reference polarization sits on a random branch.

    The model sees continuous positions; the reference is Σ z r / Ω evaluated with some
    atoms moved by lattice vectors (what a Berry-phase code or wrapped coordinates give).
    """
    rng = np.random.default_rng(seed)
    structures, refs = [], []
    for _ in range(n):
        a = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
        a.positions += rng.normal(scale=0.25, size=a.positions.shape)
        moved = a.copy()
        for i in rng.choice(len(a), size=2, replace=False):
            moved.positions[i] += a.cell[int(rng.integers(3))] * rng.choice([-1, 1])
        structures.append(a)
        refs.append(_ionic_polarization(moved))
    return structures, _t(refs)


def _train(loss_kind: str, structures, refs, steps: int = 120):
    torch.manual_seed(0)
    model = augment(make_test_model(), "les", coupling_init=1.0)
    batch = atoms_to_batch(structures, model.atomic_numbers, model.r_max, dtype=torch.float64)
    cell = batch["cell"].view(-1, 3, 3)
    volume = torch.tensor([abs(a.get_volume()) for a in structures], dtype=torch.float64)
    params = list(model.blocks.parameters())
    opt = torch.optim.Adam(params, lr=0.02)

    def predict():
        return model(batch, training=True, compute_force=False)["dipole"] / volume[:, None]

    for _ in range(steps):
        opt.zero_grad()
        pred = predict()
        if loss_kind == "modulo":
            loss = polarization_loss(pred, refs, cell)
        else:
            loss = ((pred - refs) ** 2).sum(-1).mean()
        loss.backward()
        opt.step()
    with torch.no_grad():
        err = polarization_minimum_image(predict().detach() - refs, cell)
    return float(err.pow(2).sum(-1).mean().sqrt())


def test_training_with_the_modulo_loss_learns_across_branch_jumps():
    structures, refs = _branch_jump_data()
    spread = float((refs - refs.mean(0)).pow(2).sum(-1).mean().sqrt())
    modulo = _train("modulo", structures, refs)
    plain = _train("plain", structures, refs)
    # judged on the physical (modulo) error; the plain loss chases the branch jumps
    assert modulo < 0.1 * plain, (modulo, plain, spread)
    assert modulo < 0.05 * spread, (modulo, spread)


def test_training_dipole_loss_is_modulo_the_lattice_for_periodic_structures():
    from mace_lr.cli.run_train import LongRangeLoss

    class Zero(torch.nn.Module):
        def forward(self, ref, pred):
            return torch.zeros((), dtype=torch.float64)

    cells = _cells()
    periodic, slab = cells[0], cells[2]
    molecule = periodic.copy()
    molecule.pbc = False
    molecule.cell = np.zeros((3, 3))
    structures = [periodic, slab, molecule]
    loss_fn = LongRangeLoss(Zero(), dipole_weight=1.0)
    ref = torch.stack([_t((a.positions * 0.1).sum(0)) for a in structures])
    pred = ref + _t([[0.01, -0.02, 0.03]] * 3)
    batch = {
        "cell": _t(np.concatenate([np.asarray(a.cell) for a in structures])),
        "pbc": torch.tensor(np.array([a.pbc for a in structures])),
        "dipole": ref,
    }
    base = float(loss_fn(batch, {"dipole": pred}))
    assert abs(base - float(((pred - ref) ** 2).mean())) < 1e-15  # small errors: the plain loss
    shifted = ref.clone()
    shifted[0] += 2 * _t(periodic.cell[1]) - _t(periodic.cell[2])  # other branches
    shifted[1] -= _t(slab.cell[0])
    assert abs(float(loss_fn({**batch, "dipole": shifted}, {"dipole": pred})) - base) < 1e-12
    # no quantum along the slab normal, nor for a molecule
    moved = ref.clone()
    moved[1, 2] += 5.64
    assert float(loss_fn({**batch, "dipole": moved}, {"dipole": pred})) > base + 1.0
    moved = ref.clone()
    moved[2, 0] += 5.64
    assert float(loss_fn({**batch, "dipole": moved}, {"dipole": pred})) > base + 1.0
