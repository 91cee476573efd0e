"""Contract tests any long-range block can run (ours and third parties').

Typical use in a plugin's test suite::

    from mace_lr.testing import run_block_contract
    def test_my_block_contract():
        run_block_contract("my_block", config={"width": 2.0})

Each ``assert_*`` function raises ``AssertionError`` with a message saying which
property failed and by how much. The reference systems are small NaCl-like structures
(periodic, open cluster, slab) built by :func:`reference_systems`.
"""

from __future__ import annotations

import copy
import os
import tempfile
from typing import Any, Dict, Optional, Sequence

import mace  # noqa: F401
import numpy as np
import torch

from ._data import atoms_to_batch
from ._model import LongRangeMACE, augment
from ._test_systems import (
    FOUNDATION_ARCHITECTURES,
    make_foundation_like_model,
    make_test_model,
    reference_systems,
)

__all__ = [
    "FOUNDATION_ARCHITECTURES",
    "make_foundation_like_model",
    "make_test_model",
    "reference_systems",
    "perturb_blocks",
    "evaluate",
    "assert_identity_at_init",
    "assert_forces_match_finite_differences",
    "assert_stress_matches_finite_differences",
    "assert_invariances",
    "assert_batch_consistency",
    "assert_dtype_consistency",
    "assert_parameters_train_and_save",
    "assert_born_charges_match_finite_differences",
    "assert_scriptable",
    "run_block_contract",
]


def perturb_blocks(model: LongRangeMACE, scale: float = 0.3, seed: int = 1) -> LongRangeMACE:
    """A copy of ``model`` whose block parameters are moved off their initial values.

    Gives blocks non-zero energies, charges and gradients so that derivative tests test
    something. Scalar parameters are moved to ``+scale`` (a positive coupling).
    """
    model = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.blocks.values():
            for p in block.parameters():
                if p.ndim == 0:
                    p.fill_(abs(scale) + float(p))
                else:
                    p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device))
    return model


def evaluate(model: LongRangeMACE, atoms_list, **kwargs) -> Dict[str, Any]:
    """Run ``model`` on a list of structures and return detached outputs."""
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    batch = atoms_to_batch(
        atoms_list if isinstance(atoms_list, (list, tuple)) else [atoms_list],
        model.atomic_numbers,
        float(model.r_max),
        heads=getattr(model, "heads", None),
        inputs=getattr(model, "declared_inputs", ()),
        dtype=dtype,
        device=device,
    )
    if isinstance(model, LongRangeMACE):
        out = model(batch, **kwargs)
    else:
        out = model(batch, compute_force=True, compute_stress=kwargs.get("compute_stress", False))
    return {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in out.items()}


def _energy(model, atoms) -> float:
    return float(evaluate(model, [atoms], compute_force=False)["energy"][0])


def assert_identity_at_init(
    base: torch.nn.Module, model: LongRangeMACE, systems: Sequence, atol: float = 1e-10
) -> None:
    """Energy, forces and stress of ``model`` equal those of ``base``."""
    for atoms in systems:
        ref = evaluate(base, [atoms], compute_stress=True)
        got = evaluate(model, [atoms], compute_stress=True)
        for key in ("energy", "forces", "stress"):
            diff = float((ref[key] - got[key]).abs().max())
            assert diff <= atol, (
                f"identity at init: {key} differs from the base model by {diff:.3g} (> {atol:g}) "
                f"for {atoms.get_chemical_formula()} pbc={atoms.pbc.tolist()}"
            )


def assert_forces_match_finite_differences(
    model: LongRangeMACE,
    atoms,
    h: float = 1e-4,
    rtol: float = 1e-5,
    atol: float = 1e-6,
    max_components: int = 12,
    seed: int = 0,
) -> None:
    """Forces agree with central differences of the energy (selected components)."""
    forces = evaluate(model, [atoms])["forces"].cpu().numpy()
    rng = np.random.default_rng(seed)
    comps = [(i, a) for i in range(len(atoms)) for a in range(3)]
    picks = rng.choice(len(comps), size=min(max_components, len(comps)), replace=False)
    for k in picks:
        i, a = comps[k]
        plus, minus = atoms.copy(), atoms.copy()
        plus.positions[i, a] += h
        minus.positions[i, a] -= h
        fd = -(_energy(model, plus) - _energy(model, minus)) / (2 * h)
        err = abs(fd - forces[i, a])
        assert err <= atol + rtol * abs(fd) + 1e-3 * h, (
            f"force F[{i},{a}] = {forces[i, a]:.8g} but finite difference gives {fd:.8g} "
            f"(error {err:.3g}) for pbc={atoms.pbc.tolist()}"
        )


def assert_stress_matches_finite_differences(
    model: LongRangeMACE, atoms, h: float = 1e-5, rtol: float = 1e-5, atol: float = 1e-7
) -> None:
    """Stress equals ``(1/Ω) ∂E/∂ε`` by central differences of a symmetric strain."""
    stress = evaluate(model, [atoms], compute_stress=True)["stress"][0].cpu().numpy()
    volume = abs(np.linalg.det(atoms.cell[:]))
    for a in range(3):
        for b in range(a, 3):
            energies = []
            for sign in (1.0, -1.0):
                eps = np.zeros((3, 3))
                eps[a, b] += 0.5 * sign * h
                eps[b, a] += 0.5 * sign * h
                strained = atoms.copy()
                strained.set_cell(atoms.cell[:] @ (np.eye(3) + eps), scale_atoms=False)
                strained.positions = atoms.positions @ (np.eye(3) + eps)
                energies.append(_energy(model, strained))
            fd = (energies[0] - energies[1]) / (2 * h) / volume
            err = abs(fd - stress[a, b])
            assert err <= atol + rtol * abs(fd), (
                f"stress[{a},{b}] = {stress[a, b]:.8g} eV/Å³ but finite difference gives {fd:.8g} "
                f"(error {err:.3g}) for pbc={atoms.pbc.tolist()}"
            )


def _random_rotation(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    return q


def assert_invariances(model: LongRangeMACE, atoms, atol: float = 1e-8, seed: int = 0) -> None:
    """Energy invariant and forces covariant under rotation, translation and permutation.

    Rotations are applied to open systems only (rotating a slab would tilt its plane);
    periodic cells are rotated together with their atoms.
    """
    ref = evaluate(model, [atoms])
    e0, f0 = float(ref["energy"][0]), ref["forces"].cpu().numpy()
    # translation
    moved = atoms.copy()
    moved.positions += (
        np.array([0.37, -1.21, 0.58]) if not atoms.pbc[2] or atoms.pbc.all() else np.array([0.37, -1.21, 0.0])
    )
    out = evaluate(model, [moved])
    assert abs(float(out["energy"][0]) - e0) <= atol * max(1, abs(e0)), (
        f"translation changes the energy by {float(out['energy'][0]) - e0:.3g}"
    )
    assert np.abs(out["forces"].cpu().numpy() - f0).max() <= 10 * atol, "translation changes the forces"
    # permutation
    perm = np.random.default_rng(seed).permutation(len(atoms))
    permuted = atoms[perm]
    out = evaluate(model, [permuted])
    assert abs(float(out["energy"][0]) - e0) <= atol * max(1, abs(e0)), (
        f"permutation changes the energy by {float(out['energy'][0]) - e0:.3g}"
    )
    assert np.abs(out["forces"].cpu().numpy() - f0[perm]).max() <= 10 * atol, (
        "forces do not follow a permutation of the atoms"
    )
    # rotation
    if atoms.pbc.all() or not atoms.pbc.any():
        rot = _random_rotation(seed)
        rotated = atoms.copy()
        rotated.positions = atoms.positions @ rot.T
        if atoms.pbc.all():
            rotated.set_cell(atoms.cell[:] @ rot.T, scale_atoms=False)
        out = evaluate(model, [rotated])
        assert abs(float(out["energy"][0]) - e0) <= atol * max(1, abs(e0)), (
            f"rotation changes the energy by {float(out['energy'][0]) - e0:.3g}"
        )
        err = np.abs(out["forces"].cpu().numpy() - f0 @ rot.T).max()
        assert err <= 10 * atol, f"forces do not rotate with the structure (error {err:.3g})"


def assert_batch_consistency(model: LongRangeMACE, systems: Sequence, atol: float = 1e-9) -> None:
    """A batch of structures gives the same results as each structure alone."""
    batched = evaluate(model, list(systems), compute_stress=True)
    start = 0
    for g, atoms in enumerate(systems):
        single = evaluate(model, [atoms], compute_stress=True)
        n = len(atoms)
        de = abs(float(batched["energy"][g] - single["energy"][0]))
        df = float((batched["forces"][start : start + n] - single["forces"]).abs().max())
        ds = float((batched["stress"][g] - single["stress"][0]).abs().max())
        assert max(de, df, ds) <= atol, (
            f"batch vs single for structure {g}: energy {de:.3g}, forces {df:.3g}, stress {ds:.3g}"
        )
        start += n


def assert_dtype_consistency(model: LongRangeMACE, atoms, rtol: float = 1e-4) -> None:
    """float32 and float64 copies of the model agree to float32 precision."""
    m64 = copy.deepcopy(model).to(torch.float64)
    m32 = copy.deepcopy(model).to(torch.float32)
    o64 = evaluate(m64, [atoms])
    o32 = evaluate(m32, [atoms])
    assert o32["energy"].dtype == torch.float32 and o32["forces"].dtype == torch.float32, (
        "float32 model returned non-float32 outputs"
    )
    de = abs(float(o64["energy"][0]) - float(o32["energy"][0]))
    assert de <= rtol * max(1.0, abs(float(o64["energy"][0]))), (
        f"float32 energy differs from float64 by {de:.3g}"
    )
    fscale = max(1.0, float(o64["forces"].abs().max()))
    df = float((o64["forces"] - o32["forces"].double()).abs().max())
    assert df <= 10 * rtol * fscale, f"float32 forces differ from float64 by {df:.3g}"


def assert_parameters_train_and_save(model: LongRangeMACE, systems: Sequence) -> None:
    """Every block parameter gets a gradient from an energy+force loss, is in
    ``model.parameters()`` (so the optimiser sees it) and survives save/load.

    The structures get a small applied field (unless they carry one), so that parameters
    which only act in a field (the ``field`` block's) are exercised too.
    """
    from ._io import load, save

    model = copy.deepcopy(model).train()
    dtype = next(model.parameters()).dtype
    systems = [a.copy() for a in systems]
    for a in systems:
        a.info.setdefault("external_field", np.array([0.05, -0.03, 0.02]))
    batch = atoms_to_batch(
        systems,
        model.atomic_numbers,
        model.r_max,
        heads=model.heads,
        inputs=model.declared_inputs,
        dtype=dtype,
    )
    out = model(batch, training=True)
    loss = out["energy"].pow(2).sum() + out["forces"].pow(2).sum()
    loss.backward()
    ids = {id(p) for p in model.parameters()}
    for bname, block in model.blocks.items():
        for pname, p in block.named_parameters():
            assert id(p) in ids, f"parameter {bname}.{pname} is not in model.parameters()"
            assert p.grad is not None and bool(torch.isfinite(p.grad).all()), (
                f"parameter {bname}.{pname} gets no finite gradient from an energy+force loss"
            )
            assert float(p.grad.abs().max()) > 0, f"parameter {bname}.{pname} gets an all-zero gradient"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.model")
        save(model, path)
        loaded = load(path)
    for bname, block in model.blocks.items():
        state = block.state_dict()
        lstate = loaded.blocks[bname].state_dict()
        assert set(state) == set(lstate), (
            f"block {bname} state keys changed on save/load: {set(state) ^ set(lstate)}"
        )
        for k in state:
            assert torch.equal(state[k].cpu(), lstate[k].cpu()), (
                f"block {bname} tensor {k} changed on save/load"
            )
    a = evaluate(model.eval(), list(systems))
    b = evaluate(loaded, list(systems))
    assert torch.allclose(a["energy"], b["energy"], rtol=0, atol=1e-12), "energies changed after save/load"


def assert_born_charges_match_finite_differences(
    model: LongRangeMACE, atoms, field_step: float = 1e-3, atol: float = 1e-5
) -> None:
    """``Z[i, α, β] = ∂F_iβ/∂E_α`` agrees with central differences of forces in the field;
    and the acoustic sum rule ``Σ_i Z_i = ∂(Σ_i F_i)/∂E`` holds.
    """
    out = evaluate(model, [atoms], compute_born_charges=True)
    bec = out["born_effective_charges"].cpu().numpy()
    for alpha in range(3):
        forces = []
        for sign in (1.0, -1.0):
            a = atoms.copy()
            field = np.zeros(3)
            field[alpha] = sign * field_step
            a.info["external_field"] = field
            forces.append(evaluate(model, [a])["forces"].cpu().numpy())
        fd = (forces[0] - forces[1]) / (2 * field_step)
        err = np.abs(fd - bec[:, alpha, :]).max()
        assert err <= atol, (
            f"Born charges Z[:, {alpha}, :] differ from finite differences of forces by {err:.3g}"
        )


def assert_scriptable(model: LongRangeMACE, atoms, atol: float = 1e-10) -> None:
    """Every block compiles with ``torch.jit.script`` and gives the eager results.

    Parts a block marks ``@torch.jit.ignore`` (e.g. neighbour lists) still run in Python.
    """
    scripted = copy.deepcopy(model)
    for name in list(scripted.blocks.keys()):
        try:
            scripted.blocks[name] = torch.jit.script(scripted.blocks[name])
        except Exception as exc:  # report which block and why
            raise AssertionError(f"block {name!r} is not TorchScript-compilable: {exc}") from exc
    a = evaluate(model, [atoms])
    b = evaluate(scripted, [atoms])
    de = float((a["energy"] - b["energy"]).abs().max())
    df = float((a["forces"] - b["forces"]).abs().max())
    assert max(de, df) <= atol, f"scripted blocks differ from eager: energy {de:.3g}, forces {df:.3g}"


def run_block_contract(
    name: str, config: Optional[Dict[str, Any]] = None, base: Optional[torch.nn.Module] = None
) -> None:
    """Run every contract check on block ``name`` attached to a small MACE model."""
    base = base if base is not None else make_test_model()
    model = augment(base, {name: dict(config or {})})
    systems = reference_systems()
    assert_identity_at_init(base, model, list(systems.values()))
    trained = perturb_blocks(model)
    for key in ("periodic", "open", "slab"):
        assert_forces_match_finite_differences(trained, systems[key])
        assert_stress_matches_finite_differences(trained, systems[key]) if key != "open" else None
        assert_invariances(trained, systems[key])
    assert_batch_consistency(trained, [systems["periodic"], systems["slab"], systems["triclinic"]])
    assert_dtype_consistency(trained, systems["periodic"])
    assert_parameters_train_and_save(trained, [systems["periodic"], systems["open"]])
    assert_born_charges_match_finite_differences(trained, systems["open"])
    assert_scriptable(trained, systems["periodic"])
