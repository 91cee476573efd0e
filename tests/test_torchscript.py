"""Deployable TorchScript: the engines and whole models script, save, and reload in a fresh
process without Python callbacks, giving the eager results.

The open-boundary engine and the graph engine (``method="graph"``: Ewald whose real-space
part runs on the base model's edges) are TorchScript; ``LongRangeMACE.deployable()``
switches a model's blocks to it. Blocks on the default engines still call Python from a
scripted model (``@torch.jit.ignore``), which ``torch.jit.save`` refuses.
"""

import io
import json
import subprocess
import sys
import textwrap
from typing import List

import mace  # noqa: F401
import numpy as np
import pytest
import torch

from mace_lr import LongRangeMACE, augment
from mace_lr._data import atoms_to_batch
from mace_lr.electrostatics import (
    COULOMB_CONSTANT,
    coulomb_potential_batch,
    coulomb_potential_graph,
    coulomb_potential_open,
)
from mace_lr.electrostatics._graph import _KE, graph_ewald_parameters
from mace_lr.electrostatics._kernels import COINCIDENT_R2
from mace_lr.testing import (
    assert_forces_match_finite_differences,
    assert_stress_matches_finite_differences,
    make_test_model,
    perturb_blocks,
    reference_systems,
)


class OpenEnergy(torch.nn.Module):
    """Coulomb energy per graph and its position gradient, as a deployable module."""

    def forward(self, positions: torch.Tensor, charges: torch.Tensor, ptr: torch.Tensor) -> torch.Tensor:
        phi = coulomb_potential_open(positions, charges[:, None], ptr, 0.9)[:, 0]
        return 0.5 * (charges * phi).sum()


def _inputs():
    rng = np.random.default_rng(0)
    counts = [3, 7, 1, 12, 5]
    pos = torch.tensor(rng.normal(scale=1.5, size=(sum(counts), 3)))
    q = torch.tensor(rng.normal(size=sum(counts)))
    ptr = torch.tensor(np.concatenate([[0], np.cumsum(counts)]))
    return pos, q, ptr


def test_open_engine_scripts_saves_and_reloads_in_fresh_process(tmp_path):
    scripted = torch.jit.script(OpenEnergy())
    assert "prim::PythonOp" not in str(scripted.graph)
    torch.jit.save(scripted, str(tmp_path / "open.pt"))  # fails if a Python callback is in the path
    pos, q, ptr = _inputs()
    torch.save({"pos": pos, "q": q, "ptr": ptr}, tmp_path / "inputs.pt")
    x = pos.clone().requires_grad_(True)
    n = ptr.shape[0] - 1
    cell, pbc = torch.zeros(n, 3, 3, dtype=x.dtype), torch.zeros(n, 3, dtype=torch.bool)
    phi = coulomb_potential_batch(x, q, cell, pbc, ptr, 0.9)
    e_ref = 0.5 * (q * phi).sum()
    (f_ref,) = torch.autograd.grad(-e_ref, x)
    script = textwrap.dedent(
        f"""
        import json
        import torch
        m = torch.jit.load({str(tmp_path / "open.pt")!r})
        d = torch.load({str(tmp_path / "inputs.pt")!r})
        x = d["pos"].clone().requires_grad_(True)
        e = m(x, d["q"], d["ptr"])
        (g,) = torch.autograd.grad(-e, x)
        print(json.dumps({{"energy": float(e), "forces": g.tolist()}}))
        """
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert abs(out["energy"] - float(e_ref.detach())) < 1e-12
    np.testing.assert_allclose(out["forces"], f_ref.numpy(), rtol=0, atol=1e-12)


# ---------------------------------------------------------------- whole deployable models


def python_ops(module: torch.jit.ScriptModule) -> List[str]:
    """``prim::PythonOp`` nodes (Python callbacks) in every method of every submodule of a
    scripted or loaded module, called functions inlined."""
    found: List[str] = []
    for prefix, sub in module.named_modules():
        for method in sub._c._method_names():
            graph = sub._c._get_method(method).inlined_graph
            for node in graph.findAllNodes("prim::PythonOp", True):  # recursing into blocks
                found.append(f"{prefix or '<root>'}.{method}: {node}")
    return found


def _batch(model, atoms_list):
    required = ("total_charge",) if "total_charge" in model.required_inputs else ()
    return atoms_to_batch(atoms_list, model.atomic_numbers, float(model.r_max), required=required)


def _outputs(model, batch):
    out = model(batch, compute_stress=True)
    return {k: out[k].detach() for k in ("energy", "forces", "stress", "lr_energy")}


def _cases():
    systems = reference_systems()
    return {
        "periodic": [systems["periodic"]],
        "open": [systems["open"]],
        "mixed": [systems["triclinic"], systems["open"], systems["periodic"]],
    }


@pytest.fixture(scope="module")
def base():
    return make_test_model()


@pytest.fixture(scope="module")
def les_graph(base):
    """LES on the graph engine with trained-looking weights, its deployable copy scripted,
    and the eager outputs (energy, forces, stress) of :func:`_cases`."""
    model = perturb_blocks(augment(base, "les", method="graph", smearing=0.5))
    cell = torch.tensor(reference_systems()["periodic"].cell[:])
    split, rcut, _ = graph_ewald_parameters(cell, 8, 0.5, model.blocks["les"].accuracy, float(model.r_max))
    assert 0.0 < rcut <= float(model.r_max)  # the real-space part runs on the graph's edges
    refs = {key: _outputs(model, _batch(model, atoms)) for key, atoms in _cases().items()}
    return model, torch.jit.script(model.deployable()), refs


def test_graph_engine_constants_match_the_engine():
    assert _KE == COULOMB_CONSTANT and COINCIDENT_R2 == 1e-12


def test_graph_engine_reproduces_madelung_and_the_eager_engine():
    from ase.build import bulk

    crystal = bulk("NaCl", "rocksalt", a=2.0, cubic=True)  # nearest-neighbour distance 1 Å
    b = atoms_to_batch([crystal], [11, 17], 3.0)
    q = torch.tensor([1.0 if z == 11 else -1.0 for z in crystal.numbers], dtype=torch.float64)
    pbc = torch.ones(1, 3, dtype=torch.bool)
    phi = coulomb_potential_graph(
        b["positions"], q[:, None], b["cell"].view(1, 3, 3), pbc, b["ptr"], b["edge_index"], b["shifts"],
        0.0, 1e-10, 3.0,
    )  # fmt: skip
    madelung = -0.5 * float((q * phi[:, 0]).sum()) / COULOMB_CONSTANT / 4
    assert abs(madelung - 1.7475645946) < 1e-9
    # Gaussian charges, a periodic + open + periodic batch, against the eager engine
    systems = reference_systems()
    open_ = systems["open"]
    atoms = [systems["triclinic"], open_, systems["periodic"]]
    b = atoms_to_batch(atoms, [11, 17], 5.0)
    q = torch.tensor([1.0 if z == 11 else -1.0 for a in atoms for z in a.numbers], dtype=torch.float64)
    cell, pbc = b["cell"].view(-1, 3, 3), b["pbc"].view(-1, 3)
    for sigma in (0.0, 0.5, 1.0):
        split, rcut, _ = graph_ewald_parameters(cell[0], len(atoms[0]), sigma, 1e-8, 5.0)
        # at 1e-8 the real-space part needs r_c = 6.3 s <= 5 Å: s = 0.79 Å for σ < 0.79 Å
        # (both Ewald parts), s = σ and no real-space part for σ = 1 Å
        assert rcut <= 5.0 and (rcut > 0) == (sigma < 0.7) and split >= sigma
        x = b["positions"].clone().requires_grad_(True)
        shifts = torch.einsum("ei,eij->ej", b["unit_shifts"], cell[b["batch"][b["edge_index"][0]]])
        phi = coulomb_potential_graph(
            x, q[:, None], cell, pbc, b["ptr"], b["edge_index"], shifts, sigma, 1e-8, 5.0
        )
        (f,) = torch.autograd.grad(-0.5 * (q * phi[:, 0]).sum(), x)
        y = b["positions"].clone().requires_grad_(True)
        ref = coulomb_potential_batch(y, q, cell, pbc, b["ptr"], smearing=sigma or None, accuracy=1e-10)
        (f_ref,) = torch.autograd.grad(-0.5 * (q * ref).sum(), y)
        phi, ref = phi.detach(), ref.detach()
        assert float((phi[:, 0] - ref).abs().max()) < 1e-7
        assert float((f - f_ref).abs().max()) < 1e-7
        opened = slice(int(b["ptr"][1]), int(b["ptr"][2]))  # the open cluster is exact in both
        assert float((phi[opened, 0] - ref[opened]).abs().max()) < 1e-13


def test_graph_engine_refuses_slabs():
    systems = reference_systems()
    b = atoms_to_batch([systems["slab"]], [11, 17], 5.0)
    q = torch.zeros(len(systems["slab"]), 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="not slabs"):
        coulomb_potential_graph(
            b["positions"], q, b["cell"].view(1, 3, 3), b["pbc"].view(1, 3), b["ptr"], b["edge_index"],
            b["shifts"], 1.0, 1e-3, 5.0,
        )  # fmt: skip


def test_graph_engine_les_forces_and_stress_match_finite_differences(les_graph):
    model = les_graph[0]
    systems = reference_systems()
    for key in ("periodic", "triclinic"):
        assert_forces_match_finite_differences(model, systems[key])
        assert_stress_matches_finite_differences(model, systems[key])


def test_deployable_copy_switches_the_engine_and_keeps_the_weights(base):
    trained = perturb_blocks(augment(base, "les", accuracy=1e-7))
    deployable = trained.deployable()
    assert deployable.blocks["les"].method == "graph" and trained.blocks["les"].method == "auto"
    for a, b in zip(trained.blocks["les"].parameters(), deployable.blocks["les"].parameters()):
        assert torch.equal(a, b)
    # the same physics at matched accuracy: the graph engine's Ewald sum agrees with the
    # default engine's to the requested accuracy, and exactly for open boundaries
    for key, atoms in _cases().items():
        a, b = _outputs(trained, _batch(trained, atoms)), _outputs(deployable, _batch(trained, atoms))
        tol = 1e-12 if key == "open" else 1e-5
        assert float((a["energy"] - b["energy"]).abs().max()) < tol * max(1.0, float(a["energy"].abs().max()))
        assert float((a["forces"] - b["forces"]).abs().max()) < tol


def test_default_engine_model_scripts_with_callbacks_and_save_refuses_it(les_graph):
    blocks = perturb_blocks(augment(les_graph[0].base, "les")).blocks  # the default engine
    scripted = torch.jit.script(LongRangeMACE(les_graph[1].base, dict(blocks)))  # a compiled base
    assert python_ops(scripted), "the Python engine call should appear as a prim::PythonOp"
    with pytest.raises(RuntimeError, match="Python function"):
        torch.jit.save(scripted, io.BytesIO())


def test_les_model_scripts_saves_and_reloads_in_process(les_graph):
    model, scripted, refs = les_graph
    assert python_ops(scripted) == []
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    assert python_ops(loaded) == []
    # the graph interpreter without the profiling executor's re-optimisation per input
    # shape (seconds per shape); the fresh-process test below runs the default executor
    with torch.jit.optimized_execution(False):
        for key, atoms in _cases().items():
            for candidate in (scripted, loaded):
                got = _outputs(candidate, _batch(model, atoms))
                for name, value in refs[key].items():
                    err = float((got[name] - value).abs().max())
                    assert err <= 1e-10, f"{key}: {name} differs by {err:.3g}"


def _run_in_fresh_process(scripted, batches, tmp_path, **kwargs):
    """Save ``scripted``, load it in a new interpreter that imports torch only, evaluate
    ``batches`` there; returns the Python ops and mace/e3nn modules found there and the
    energies, forces and stress per batch."""
    torch.jit.save(scripted, str(tmp_path / "model.pt"))
    torch.save(batches, tmp_path / "inputs.pt")
    script = textwrap.dedent(
        f"""
        import json, sys
        import torch
        torch.set_num_threads(1)
        m = torch.jit.load({str(tmp_path / "model.pt")!r})
        ops = []
        for s in m.modules():
            for name in s._c._method_names():
                graph = s._c._get_method(name).inlined_graph
                ops += [str(n) for n in graph.findAllNodes("prim::PythonOp", True)]
        ours = sorted(k for k in sys.modules if k.split(".")[0] in ("mace", "mace_lr", "e3nn"))
        result = {{"python_ops": ops, "modules": ours}}
        for key, data in torch.load({str(tmp_path / "inputs.pt")!r}).items():
            out = m(data, compute_stress=True, **{kwargs!r})
            result[key] = {{k: out[k].detach().tolist() for k in ("energy", "forces", "stress")}}
        print(json.dumps(result))
        """
    )
    env = {"OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_les_model_reloads_in_a_fresh_process_without_mace_lr(les_graph, tmp_path):
    model, scripted, refs = les_graph
    cases = _cases()
    out = _run_in_fresh_process(
        scripted, {key: _batch(model, atoms) for key, atoms in cases.items()}, tmp_path
    )
    assert out["python_ops"] == [] and out["modules"] == []
    for key in cases:
        for name in ("energy", "forces", "stress"):
            np.testing.assert_allclose(
                out[key][name], refs[key][name].numpy(), rtol=0, atol=1e-10, err_msg=key
            )


@pytest.mark.slow
def test_all_charge_blocks_in_one_model_reload_in_a_fresh_process(base, tmp_path):
    config = {
        "les": {"method": "graph"},
        "qeq": {"method": "graph"},
        "wannier": {"method": "graph", "centroid_electrons": {"Cl": 8}},
        "field": {},
    }
    model = perturb_blocks(augment(base, config))
    cases = {}
    for key, atoms in _cases().items():
        atoms = [a.copy() for a in atoms]
        for a in atoms:
            a.info["charge"] = 0.0
            a.info["external_field"] = np.array([0.01, 0.02, -0.01])
        cases[key] = atoms
    batches = {key: _batch(model, atoms) for key, atoms in cases.items()}
    out = _run_in_fresh_process(torch.jit.script(model.deployable()), batches, tmp_path, compute_dipole=True)
    assert out["python_ops"] == [] and out["modules"] == []
    for key, atoms in cases.items():
        ref = model(_batch(model, atoms), compute_stress=True, compute_dipole=True)
        for name in ("energy", "forces", "stress"):
            np.testing.assert_allclose(
                out[key][name], ref[name].detach().numpy(), rtol=0, atol=1e-10, err_msg=key
            )


def _assert_round_trip(model, cases, atol=1e-10, **kwargs):
    """``model.deployable()`` scripts without callbacks, saves, reloads, and gives ``model``'s
    eager outputs (``model`` on the graph engine) to ``atol``."""
    scripted = torch.jit.script(model.deployable())
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    assert python_ops(loaded) == []
    with torch.jit.optimized_execution(False):
        for key, atoms in cases.items():
            ref = model(_batch(model, atoms), **kwargs)
            got = loaded(_batch(model, atoms), **kwargs)
            for name in ("energy", "forces", "stress", "dipole"):
                if ref.get(name) is None:
                    continue
                err = float((got[name].detach() - ref[name].detach()).abs().max())
                assert err <= atol, f"{key}: {name} differs by {err:.3g}"


def test_wannier_model_round_trip_and_graph_engine_accuracy(base):
    trained = perturb_blocks(augment(base, "wannier", centroid_electrons={"Cl": 8}, accuracy=1e-8))
    deployable = trained.deployable()
    assert deployable.blocks["wannier"].method == "graph"
    _assert_round_trip(deployable, _cases(), compute_stress=True)
    # centroids are off the graph: the periodic sum is purely reciprocal (s = σ), and it
    # agrees with the default engine at the requested accuracy
    for key, atoms in _cases().items():
        a, b = _outputs(trained, _batch(trained, atoms)), _outputs(deployable, _batch(trained, atoms))
        scale = float(a["energy"].abs().max())
        assert float((a["energy"] - b["energy"]).abs().max()) <= 1e-8 * scale
        assert float((a["forces"] - b["forces"]).abs().max()) <= 1e-6


def test_field_and_les_model_round_trip_in_a_field(base):
    model = perturb_blocks(augment(base, {"les": {"method": "graph"}, "field": {}}))
    systems = reference_systems()
    cases = {}
    for key in ("periodic", "open"):
        atoms = systems[key].copy()
        atoms.info["external_field"] = np.array([0.02, -0.01, 0.03])
        cases[key] = [atoms]
    _assert_round_trip(model, cases, compute_stress=True, compute_dipole=True)


def test_qeq_model_round_trip_and_graph_solver_accuracy(base):
    systems = reference_systems()
    cases = {}
    for key, charge in (("periodic", 1.0), ("open", -1.0), ("triclinic", 0.0)):
        atoms = systems[key].copy()
        atoms.info["charge"] = charge
        cases[key] = [atoms]
    cases["mixed"] = cases["triclinic"] + cases["open"]
    trained = perturb_blocks(augment(base, "qeq", accuracy=1e-8, solver="dense"))
    deployable = trained.deployable()
    _assert_round_trip(deployable, cases, compute_stress=True)
    # the dense graph solver (periodic: a purely reciprocal sum with per-atom form factors)
    # against the eager dense solver (Ewald plus a real-space width correction), charged
    # cells included; open structures are the same exact sum
    for key, atoms in cases.items():
        kw = {"required": ("total_charge",)}
        a = trained(atoms_to_batch(atoms, trained.atomic_numbers, float(trained.r_max), **kw))
        b = deployable(atoms_to_batch(atoms, trained.atomic_numbers, float(trained.r_max), **kw))
        for name, tol in (("energy", 1e-5), ("charges", 1e-6), ("forces", 1e-6)):
            err = float((a[name].detach() - b[name].detach()).abs().max())
            assert err <= (1e-12 if key == "open" else tol), f"{key}: {name} differs by {err:.3g}"
