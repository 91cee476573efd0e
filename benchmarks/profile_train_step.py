"""Where the LES block's share of a training step goes (``bench_train_throughput.py``'s setting).

Builds the benchmark's backbone (MACE-OFF23-small-sized, random weights, float64) and one
batch of 32 structures of ``data/dimers_train.xyz`` through mace's own data pipeline, then
times one training step — forward with forces (``create_graph=True``), an energy + force
loss, ``loss.backward()`` — for the plain model and for ``mace_lr.augment(base, "les")``,
interleaved, and prints the medians and a ``torch.profiler`` table of both (self CPU time
per operator, the LES run's extra share first).

The built backbone keeps its 10 elements; mace's fine-tuning keeps only the data's four
(H, C, N, O), so its steps take about half as long. ``--models PLAIN LES`` times two model
files instead (e.g. ``mace_0/mace_0.model`` and ``les_0/les_0.model`` of a
``bench_train_throughput.py`` work folder), and ``--mace-step`` runs mace's own
``take_step`` (its weighted energy + forces loss, Adam with AMSGrad, gradient clipping at
10, learning rate 0 so that the weights stay put) instead of the bare step.

    OMP_NUM_THREADS=1 python benchmarks/profile_train_step.py [--repeats 15] [--threads 1]
    python benchmarks/profile_train_step.py --no-profile --json step.json
    python benchmarks/profile_train_step.py --models W/mace_0/mace_0.model W/les_0/les_0.model --mace-step
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time


def _batch(n_structures: int, z_table, r_max: float):
    import ase.io
    from mace import data as mace_data
    from mace.tools import torch_geometric as tg
    from mace.tools.utils import AtomicNumberTable

    here = os.path.dirname(os.path.abspath(__file__))
    frames = ase.io.read(os.path.join(here, "..", "data", "dimers_train.xyz"), f":{n_structures}")
    keyspec = mace_data.KeySpecification(
        info_keys={"energy": "REF_energy"}, arrays_keys={"forces": "REF_forces"}
    )
    table = AtomicNumberTable([int(z) for z in z_table])
    items = [
        mace_data.AtomicData.from_config(
            mace_data.config_from_atoms(atoms, key_specification=keyspec, head_name="Default"),
            z_table=table,
            cutoff=r_max,
            heads=["Default"],
        )
        for atoms in frames
    ]
    return tg.batch.Batch.from_data_list(items)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--arch", default="off23-small")
    parser.add_argument(
        "--coupling", type=float, default=0.0, help="LES coupling a (0: as in training start)"
    )
    parser.add_argument("--no-profile", action="store_true", help="medians only, no torch.profiler table")
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--json", help="write the medians and the LES run's energy/forces sums here")
    parser.add_argument("--models", nargs=2, metavar=("PLAIN", "LES"), help="a mace and a mace-lr model file")
    parser.add_argument("--mace-step", action="store_true", help="time mace's own take_step")
    args = parser.parse_args()

    import mace  # noqa: F401  (before e3nn)
    import torch

    import mace_lr
    from mace_lr import testing as T

    torch.set_num_threads(args.threads)
    torch.set_default_dtype(torch.float64)
    if args.models:
        base = torch.load(args.models[0], weights_only=False, map_location="cpu")
        les = mace_lr.load(args.models[1])
    else:
        base = T.make_foundation_like_model(args.arch, dtype=torch.float64)
        les = mace_lr.augment(base, "les")
        with torch.no_grad():
            les.blocks["les"].coupling.fill_(args.coupling)
    graphs = _batch(args.batch, base.atomic_numbers.tolist(), float(base.r_max))
    batch = graphs.to_dict()
    ref_e = batch["energy"]
    ref_f = batch["forces"]
    if args.mace_step:
        import sys

        from mace.modules.loss import WeightedEnergyForcesLoss

        take_step = sys.modules["mace.tools.train"].take_step
        loss_fn = WeightedEnergyForcesLoss(energy_weight=1.0, forces_weight=100.0)
        optimizers = {id(m): torch.optim.Adam(m.parameters(), lr=0.0, amsgrad=True) for m in (base, les)}
        output_args = {"forces": True, "virials": False, "stress": False}

    def step(model):
        if args.mace_step:
            loss, _ = take_step(
                model, loss_fn, graphs, optimizers[id(model)], None, output_args, 10.0, torch.device("cpu")
            )
            return None, loss
        model.zero_grad(set_to_none=True)
        data = dict(batch)
        data["positions"] = batch["positions"].clone()
        out = model(data, training=True, compute_force=True)
        loss = ((out["energy"] - ref_e) ** 2).mean() + 10.0 * ((out["forces"] - ref_f) ** 2).mean()
        loss.backward()
        return out, loss

    models = {"mace": base, "mace+les": les}
    for model in models.values():  # warm-up
        step(model)
        step(model)
    times = {name: [] for name in models}
    for _ in range(args.repeats):
        for name, model in models.items():
            t0 = time.perf_counter()
            step(model)
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(t) for name, t in times.items()}
    n_atoms = int(batch["positions"].shape[0])
    what = "mace's take_step" if args.mace_step else "forward + forces with create_graph + loss backward"
    source = " and ".join(args.models) if args.models else f"{args.arch} backbone"
    print(
        f"\nTraining step ({what}), {source}, "
        f"{args.batch} structures ({n_atoms} atoms), float64, {args.threads} thread(s), "
        f"median of {args.repeats}, interleaved; mace_lr from {os.path.dirname(mace_lr.__file__)}"
    )
    print(f"{'model':10s} {'s/step':>8s} {'min':>8s} {'vs mace':>8s}")
    for name in models:
        print(
            f"{name:10s} {med[name]:8.4f} {min(times[name]):8.4f} "
            f"{100 * (med[name] / med['mace'] - 1):+7.1f}%"
        )
    print(f"LES share: {1000 * (med['mace+les'] - med['mace']):.1f} ms/step")

    out, loss = step(les)
    grads = {n: p.grad for n, p in les.blocks["les"].named_parameters() if p.grad is not None}
    summary = {
        "median_s": med,
        "times_s": times,
        "loss": float(loss.detach()),
        "les_grad_norms": {n: float(g.norm()) for n, g in grads.items()},
    }
    if out is not None:
        summary["energy"] = out["energy"].detach().tolist()
        summary["forces_sum_abs"] = float(out["forces"].detach().abs().sum())
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(summary, fh)

    if not args.no_profile:
        from torch.profiler import ProfilerActivity, profile

        tables = {}
        for name, model in models.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(3):
                    step(model)
            tables[name] = {e.key: (e.self_cpu_time_total / 3.0, e.count / 3) for e in prof.key_averages()}
        keys = set(tables["mace"]) | set(tables["mace+les"])
        diff = sorted(
            ((tables["mace+les"].get(k, (0, 0))[0] - tables["mace"].get(k, (0, 0))[0], k) for k in keys),
            reverse=True,
        )
        print("\nSelf CPU time per step (ms), torch.profiler, 3 steps each; rows: largest LES - mace")
        print(f"{'operator':48s} {'mace':>9s} {'les':>9s} {'diff':>9s} {'calls+':>7s}")
        total = 0.0
        for d, k in diff[: args.rows]:
            a = tables["mace"].get(k, (0, 0))
            b = tables["mace+les"].get(k, (0, 0))
            print(f"{k[:48]:48s} {a[0] / 1e3:9.2f} {b[0] / 1e3:9.2f} {d / 1e3:9.2f} {b[1] - a[1]:7.0f}")
        total = sum(d for d, _ in diff)
        print(f"{'(sum over all operators)':48s} {'':9s} {'':9s} {total / 1e3:9.2f}")


if __name__ == "__main__":
    main()
