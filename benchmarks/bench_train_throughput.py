"""Training throughput (structures/s): ``mace_run_train`` vs ``mace_lr_run_train --lr_blocks les``.

Same small-molecule data (``data/dimers_train.xyz``, water/methanol/ammonia... monomers and
dimers, 3-34 atoms, open boundaries), same MACE-OFF23-small-sized foundation backbone
(96x0e, r_max 4.5 Å, 10 elements, random weights, saved as a ``.model`` file), batch size
32, energy + force loss, a few epochs. Three runs side by side in this invocation:

* ``mace_run_train`` fine-tuning the plain backbone;
* ``mace_lr_run_train --lr_blocks les`` (batched electrostatics: one engine call per batch);
* the same with the engine call replaced by the per-graph loop of the previous version
  (one ``coulomb_potential`` per structure), i.e. before the loop removal.

Throughput is batch size / median optimiser-step time, read from mace's own per-step
timing (the ``opt`` lines of ``results/*_train.txt``), first step excluded.

    python benchmarks/bench_train_throughput.py [--n_train 96] [--epochs 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile

PER_GRAPH = """
import torch
import mace_lr.electrostatics as es

def per_graph(positions, charges, cell, pbc, ptr, smearing=None, accuracy=1e-6, method="auto"):
    b = ptr.tolist()
    return torch.cat([es.coulomb_potential(positions[a:c], charges[a:c], cell[g], pbc[g].tolist(),
                                           smearing, accuracy, method)
                      for g, (a, c) in enumerate(zip(b[:-1], b[1:]))])

es.coulomb_potential_batch = per_graph
"""


def _run(kind: str, workdir: str, args) -> float:
    name = kind.replace("+", "_")
    out = os.path.join(workdir, name)
    flags = [
        "--name", name,
        "--foundation_model", os.path.join(workdir, "found.model"),
        "--multiheads_finetuning", "False",
        "--train_file", os.path.join(workdir, "train.xyz"),
        "--valid_file", os.path.join(workdir, "valid.xyz"),
        "--energy_key", "REF_energy", "--forces_key", "REF_forces",
        "--E0s", "average",
        "--batch_size", "32", "--valid_batch_size", "32",
        "--max_num_epochs", str(args.epochs),
        "--device", "cpu", "--default_dtype", "float64", "--seed", "1",
        "--model_dir", out, "--checkpoints_dir", os.path.join(out, "ckpt"),
        "--log_dir", os.path.join(out, "logs"), "--results_dir", os.path.join(out, "results"),
        "--lr", "0.001", "--pin_memory", "False", "--num_workers", "0",
    ]  # fmt: skip
    if kind == "mace":
        cmd = [sys.executable, "-m", "mace.cli.run_train", *flags]
    else:
        flags += ["--lr_blocks", "les"]
        prefix = PER_GRAPH if kind == "les-per-graph" else ""
        code = prefix + f"\nfrom mace_lr.cli.run_train import main\nmain({flags!r})\n"
        cmd = [sys.executable, "-c", code]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{res.stderr[-4000:]}")
    times = []
    for path in glob.glob(os.path.join(out, "results", "*_train.txt")):
        with open(path) as fh:
            for line in fh:
                row = json.loads(line)
                if row.get("mode") == "opt" and "time" in row:
                    times.append(float(row["time"]))
    if len(times) < 2:
        raise SystemExit(f"{kind}: no per-step timings found in {out}/results")
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n_train", type=int, default=96)
    parser.add_argument("--n_valid", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--arch", default="off23-small")
    args = parser.parse_args()

    import ase.io
    import torch

    from mace_lr import testing as T

    here = os.path.dirname(os.path.abspath(__file__))
    frames = ase.io.read(os.path.join(here, "..", "data", "dimers_train.xyz"), ":")
    workdir = tempfile.mkdtemp(prefix="bench_train_")
    ase.io.write(os.path.join(workdir, "train.xyz"), frames[: args.n_train], format="extxyz")
    ase.io.write(
        os.path.join(workdir, "valid.xyz"),
        frames[args.n_train : args.n_train + args.n_valid],
        format="extxyz",
    )
    torch.save(T.make_foundation_like_model(args.arch), os.path.join(workdir, "found.model"))
    rows = []
    for kind in ("mace", "les", "les-per-graph"):
        step = _run(kind, workdir, args)
        rows.append((kind, step))
        print(f"  {kind}: {step:.3f} s/step", file=sys.stderr, flush=True)
    base = rows[0][1]
    print(
        f"\nTraining throughput, {args.arch} backbone, batch 32, {args.n_train} train structures, "
        f"{args.epochs} epochs, float64, {args.threads} threads"
    )
    print(f"{'run':36s} {'s/step':>8s} {'structures/s':>13s} {'vs mace':>8s}")
    names = {
        "mace": "mace_run_train (plain)",
        "les": "mace_lr_run_train LES, batched",
        "les-per-graph": "mace_lr_run_train LES, per-graph loop",
    }
    for kind, step in rows:
        print(f"{names[kind]:36s} {step:8.3f} {32 / step:13.2f} {100 * (step / base - 1):+7.1f}%")


if __name__ == "__main__":
    main()
