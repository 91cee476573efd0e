"""Profile of the attention block (energy+forces, float64, 1 thread) on a rattled NaCl box.

    OMP_NUM_THREADS=1 python benchmarks/profile_attention.py 8 tag prof   # N = 8*8^3 = 4096

Prints CPU time and, with a third argument, the torch.profiler table; saves E and forces
to /tmp/attnprof/ref_<cells>_<tag>.pt for comparing two implementations.
"""

import os
import sys
import time

import mace  # noqa
import numpy as np
import torch
from ase.build import bulk
from e3nn import o3

import mace_lr
from mace_lr import testing as T
from mace_lr._data import atoms_to_batch

torch.set_num_threads(1)
nc = int(sys.argv[1])
atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True) * (nc, nc, nc)
atoms.positions += np.random.default_rng(0).normal(scale=0.1, size=atoms.positions.shape)
base = T.make_test_model(hidden_irreps="8x0e", r_max=4.0, num_interactions=2, dtype=torch.float64)
model = T.perturb_blocks(mace_lr.augment(base, {"attention": {}}), scale=0.1)
for p in model.parameters():
    p.requires_grad_(False)
batch = atoms_to_batch([atoms], [11, 17], 4.0, dtype=torch.float64)
block = model.blocks["attention"]
n = len(atoms)
gen = torch.Generator().manual_seed(0)
ctx = {
    "positions": batch["positions"],
    "cell": batch["cell"].reshape(-1, 3, 3),
    "pbc": torch.ones(1, 3, dtype=torch.bool),
    "batch": torch.zeros(n, dtype=torch.int64),
    "ptr": torch.tensor([0, n]),
    "node_feats": torch.randn(n, o3.Irreps(block.feature_irreps).dim, generator=gen).double(),
}


def step():
    pos = ctx["positions"].detach().clone().requires_grad_(True)
    local = dict(ctx)
    local["positions"] = pos
    e = block(local)["energy"].sum()
    (g,) = torch.autograd.grad(e, pos)
    return float(e.detach()), g


e0, g0 = step()
t = time.process_time()
e, g = step()
print("cpu", time.process_time() - t, "E", repr(e), "spacing", block.mesh_spacing())
os.makedirs("/tmp/attnprof", exist_ok=True)
torch.save({"e": e, "g": g}, f"/tmp/attnprof/ref_{nc}_{sys.argv[2]}.pt")
if len(sys.argv) > 3:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))
