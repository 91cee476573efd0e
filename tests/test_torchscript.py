"""Deployable TorchScript pieces: the open-boundary engine scripts, saves, and reloads in a
fresh process without Python callbacks, giving the eager batched engine's potential.

(The LES block itself still calls the Python engine through ``@torch.jit.ignore``: the
block contract evaluates scripted blocks on periodic cells, whose engine path — neighbour
lists, Ewald/P3M parameter choice — is not TorchScript yet.)"""

import json
import subprocess
import sys
import textwrap

import mace  # noqa: F401
import numpy as np
import torch

from mace_lr.electrostatics import coulomb_potential_batch, coulomb_potential_open


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
