"""Sanity check: can a model fit one cumulene length's torsion profile at all?

Energy-only fit on the training configurations of one chain length (``data/cumulene_train.xyz``
+ ``cumulene_valid.xyz``, 28 structures at n = 10 by default, beyond the base model's
receptive field), full batch, Adam, loss the variance of the energy error (a constant offset
of the base is not what is tested); then the RMSE of the held-out profile E(θ) − E(0)
(``cumulene_test.xyz``, θ = 0°, 10°, …, 90°). Variants (same steps and learning rate):

* ``short-range``: all parameters of ``data/base_mace.model`` fine-tuned;
* ``LES``: the LES block's parameters only (base frozen), σ 1 Å;
* ``lorem-old``: lorem without its local harmonics (state from the base features only);
* ``lorem``: lorem with its local harmonics (l_max 2, 8 channels, σ 1 Å), base frozen.

    python benchmarks/lorem_one_length_fit.py --length 10 --steps 300
    python benchmarks/lorem_one_length_fit.py --length 10 11 --variants lorem  # both parities
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, nargs="+", default=[10], help="chain length(s) fitted together")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--variants", nargs="+", default=["short-range", "LES", "lorem-old", "lorem"])
    args = parser.parse_args()

    import ase.io
    import mace  # noqa: F401
    import torch

    import mace_lr
    from mace_lr._data import atoms_to_batch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data")
    base = torch.load(os.path.join(root, "base_mace.model"), weights_only=False).double()

    def frames(name):
        out = [a for a in ase.io.read(os.path.join(root, name), ":") if a.info["n_carbon"] in args.length]
        for a in out:
            a.info["charge"] = 0
        return out

    train = frames("cumulene_train.xyz") + frames("cumulene_valid.xyz")
    test = sorted(frames("cumulene_test.xyz"), key=lambda a: (a.info["n_carbon"], a.info["torsion"]))
    n_test = np.array([a.info["n_carbon"] for a in test])
    z = [int(v) for v in base.atomic_numbers]
    r_max = float(base.r_max)
    e_train = torch.tensor([a.info["REF_energy"] for a in train])
    e_test = np.array([a.info["REF_energy"] for a in test])
    print(f"n = {args.length}: {len(train)} training structures, {len(test)} profile points")
    configs = {
        "LES": ("les", {"smearing": 1.0}),
        "lorem-old": ("lorem", {"l_max": 2, "channels": 8, "smearing": 1.0, "local_harmonics": False}),
        "lorem": ("lorem", {"l_max": 2, "channels": 8, "smearing": 1.0}),
    }
    for label in args.variants:
        torch.manual_seed(0)
        if label == "short-range":
            import copy

            model = copy.deepcopy(base)
            params = list(model.parameters())
        else:
            name, cfg = configs[label]
            model = mace_lr.augment(base, {name: cfg})
            for p in model.parameters():
                p.requires_grad_(False)
            params = list(model.blocks.parameters())
            for p in params:
                p.requires_grad_(True)
        inputs = getattr(model, "declared_inputs", ())
        b_train = atoms_to_batch(train, z, r_max, inputs=inputs)
        b_test = atoms_to_batch(test, z, r_max, inputs=inputs)
        opt = torch.optim.Adam(params, lr=args.lr)
        t0 = time.perf_counter()
        for step in range(args.steps):
            opt.zero_grad()
            pred = model(dict(b_train), compute_force=False)["energy"]
            err = pred - e_train
            loss = ((err - err.mean()) ** 2).mean()  # up to a constant: the base's offset is no test
            loss.backward()
            opt.step()
        with torch.no_grad():
            e_fit = model(dict(b_train), compute_force=False)["energy"]
        e = model(dict(b_test), compute_force=False)["energy"].detach().numpy()
        train_rmse = 1000 * float((e_fit - e_train).std(unbiased=False))
        print(
            f"{label:12s} train E RMSE (offset removed) {train_rmse:7.1f} meV, {time.perf_counter() - t0:.0f} s"
        )
        for n in args.length:
            idx = np.flatnonzero(n_test == n)  # torsions 0 ... 90 degrees in order
            d_pred, d_ref = e[idx] - e[idx[0]], e_test[idx] - e_test[idx[0]]
            rmse = 1000 * np.sqrt(np.mean((d_pred - d_ref) ** 2))
            print(f"    n = {n:2d}: held-out profile RMSE {rmse:7.1f} meV | barrier {d_pred[-1]:+.3f} eV "
                  f"(reference {d_ref[-1]:+.3f})", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
