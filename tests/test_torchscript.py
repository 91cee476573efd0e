"""Deployable TorchScript: a scripted LES block saves, loads in a fresh process, and runs
without Python callbacks, giving the eager energies and forces."""

import json
import subprocess
import sys
import textwrap

import mace  # noqa: F401
import numpy as np
import pytest
import torch
from ase import Atoms

import mace_lr
from mace_lr import testing as T


def _molecules(seed=0):
    rng = np.random.default_rng(seed)
    mols = []
    for n in (3, 6, 4, 8):
        while True:
            at = Atoms(numbers=rng.choice([11, 17], size=n), positions=rng.normal(scale=1.6, size=(n, 3)))
            d = at.get_all_distances()
            np.fill_diagonal(d, 9.0)
            if d.min() > 1.8:
                mols.append(at)
                break
    return mols


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("script")
    model = T.perturb_blocks(mace_lr.augment(T.make_test_model(), "les", smearing=1.1))
    mace_lr.save(model, str(d / "eager.model"))
    scripted = torch.jit.script(model.blocks["les"])
    torch.jit.save(scripted, str(d / "les_block.pt"))  # fails if a Python callback is in the path
    return d, model


def test_scripted_les_block_has_no_python_calls(saved):
    d, _ = saved
    loaded = torch.jit.load(str(d / "les_block.pt"))
    for method in ("forward", "coulomb_energies"):
        graph = str(getattr(loaded, method).graph)
        assert "prim::PythonOp" not in graph and "ignored" not in graph


def test_scripted_les_round_trip_in_fresh_process(saved, device):
    d, model = saved
    mols = _molecules()
    ref = T.evaluate(model, mols)
    script = textwrap.dedent(
        f"""
        import json, sys
        import mace  # noqa: F401
        import torch
        import mace_lr
        from mace_lr import testing as T
        sys.path.insert(0, {str(d)!r})
        model = mace_lr.load({str(d / "eager.model")!r}, device={str(device)!r})
        model.blocks["les"] = torch.jit.load({str(d / "les_block.pt")!r}, map_location={str(device)!r})
        from ase.io import read
        mols = read({str(d / "mols.traj")!r}, ":")
        out = T.evaluate(model, mols)
        print(json.dumps({{"energy": out["energy"].cpu().tolist(), "forces": out["forces"].cpu().tolist(),
                           "lr": out["lr_energy"].cpu().tolist()}}))
        """
    )
    from ase.io import write

    write(str(d / "mols.traj"), mols)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert np.abs(np.array(out["lr"])).max() > 1e-3  # the block contributes
    np.testing.assert_allclose(out["energy"], ref["energy"].numpy(), rtol=0, atol=1e-10)
    np.testing.assert_allclose(out["forces"], ref["forces"].numpy(), rtol=0, atol=1e-10)


def test_scripted_les_refuses_periodic_cells(saved):
    d, model = saved
    model = T.perturb_blocks(mace_lr.augment(T.make_test_model(), "les"))
    model.blocks["les"] = torch.jit.script(model.blocks["les"])
    with pytest.raises(torch.jit.Error, match="open-boundary structures only"):
        T.evaluate(model, [T.reference_systems()["periodic"]])
