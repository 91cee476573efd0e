"""Training throughput (structures/s): ``mace_run_train`` vs ``mace_lr_run_train --lr_blocks les``.

Same small-molecule data (``data/dimers_train.xyz``, water/methanol/ammonia... monomers and
dimers, 3-34 atoms, open boundaries), same MACE-OFF23-small-sized foundation backbone
(96x0e, r_max 4.5 Å, 10 elements, random weights, saved as a ``.model`` file), batch size
32, energy + force loss, a few epochs. Three runs side by side in this invocation:

* ``mace_run_train`` fine-tuning the plain backbone;
* ``mace_lr_run_train --lr_blocks les`` (batched electrostatics: one engine call per batch);
* the same with the engine call replaced by the per-graph loop of the previous version
  (one ``coulomb_potential`` per structure), i.e. before the loop removal.

Step times are mace's own per-step timing (the ``opt`` lines of ``results/*_train.txt``).
The runs do not see the same batches: ``mace_lr_run_train`` reseeds the shuffling at every
epoch (a restart then continues the same run, ``mace_lr.cli._mace_fixes``), mace seeds it
once, and a step's time follows its batch's size (3-34-atom structures: batches of 32 hold
300-520 atoms). Each epoch holds every training structure once in both runs (mace drops
the last incomplete batch: keep ``--n_train`` a multiple of 32), so the
statistic is the mean step time over whole epochs, the first (warm-up) epoch excluded;
throughput is batch size / that mean. The median single-step time, the previous statistic,
is printed too: it compares different batches and is biased by their sizes. Each step's
process CPU time is logged too (a wrapper around mace's ``take_step``): with one thread it
depends much less than wall time on other processes sharing the machine. ``--repeats``
runs the three trainings that many times, in turn, and reports medians over the repeats.

    python benchmarks/bench_train_throughput.py [--n_train 96] [--epochs 3] [--threads 2] [--repeats 1]
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
from typing import Dict, List

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


#: wraps mace's ``take_step`` (looked up as a module global by its epoch loop) to log the
#: process CPU time of every optimiser step; the step itself is mace's, unchanged
CPU_TIMING = """
import json, sys, time
import mace.tools
_train = sys.modules["mace.tools.train"]
_take_step = _train.take_step
_cpu_log = open({path!r}, "w")

def _timed_take_step(*a, **k):
    start = time.process_time()
    result = _take_step(*a, **k)
    _cpu_log.write(json.dumps({{"cpu": time.process_time() - start}}) + "\\n")
    _cpu_log.flush()
    return result

_train.take_step = _timed_take_step
"""


def _run(kind: str, workdir: str, args, repeat: int = 0) -> Dict[str, float]:
    """Step times of one training, s: ``wall`` and ``cpu`` (means over the steps of epochs
    >= 1) and ``median`` (median wall time of steps >= 2, the previous statistic).
    """
    name = f"{kind.replace('+', '_')}_{repeat}"
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
    cpu_path = os.path.join(workdir, f"{name}_cpu.jsonl")
    timing = CPU_TIMING.format(path=cpu_path)
    if kind == "mace":
        code = (
            timing
            + f"\nsys.argv = ['mace_run_train', *{flags!r}]\nfrom mace.cli.run_train import main\nmain()\n"
        )
    else:
        flags += ["--lr_blocks", "les"]
        prefix = PER_GRAPH if kind == "les-per-graph" else ""
        code = timing + prefix + f"\nfrom mace_lr.cli.run_train import main\nmain({flags!r})\n"
    cmd = [sys.executable, "-c", code]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{res.stderr[-4000:]}")
    epochs: List[int] = []
    times: List[float] = []
    for path in glob.glob(os.path.join(out, "results", "*_train.txt")):
        with open(path) as fh:
            for line in fh:
                row = json.loads(line)
                if row.get("mode") == "opt" and "time" in row:
                    times.append(float(row["time"]))
                    epochs.append(int(row.get("epoch", 0)))
    with open(cpu_path) as fh:
        cpu = [float(json.loads(line)["cpu"]) for line in fh]
    later = [k for k, epoch in enumerate(epochs) if epoch >= 1]
    if len(times) < 2 or not later or len(cpu) != len(times):
        raise SystemExit(f"{kind}: no per-step timings of epochs >= 1 found in {out}/results (--epochs >= 2)")
    return {
        "wall": statistics.fmean(times[k] for k in later),
        "cpu": statistics.fmean(cpu[k] for k in later),
        "median": statistics.median(times[1:]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n_train", type=int, default=96)
    parser.add_argument("--n_valid", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--arch", default="off23-small")
    parser.add_argument(
        "--repeats", type=int, default=1, help="run the three trainings this many times, in turn"
    )
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be >= 2 (the first epoch is the warm-up)")
    if args.n_train % 32:
        parser.error("--n_train must be a multiple of the batch size 32 (whole epochs of equal work)")

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
    kinds = ("mace", "les", "les-per-graph")
    results: Dict[str, List[Dict[str, float]]] = {kind: [] for kind in kinds}
    for repeat in range(args.repeats):
        for kind in kinds:
            row = _run(kind, workdir, args, repeat)
            results[kind].append(row)
            print(
                f"  {kind} (repeat {repeat}): {row['cpu']:.3f} s/step CPU, {row['wall']:.3f} s/step "
                f"wall over epochs >= 1; median step {row['median']:.3f} s",
                file=sys.stderr,
                flush=True,
            )
    stat = {
        kind: {key: statistics.median(r[key] for r in results[kind]) for key in results[kind][0]}
        for kind in kinds
    }
    print(
        f"\nTraining throughput, {args.arch} backbone, batch 32, {args.n_train} train structures, "
        f"{args.epochs} epochs, float64, {args.threads} threads, {args.repeats} repeat(s)"
    )
    print(
        f"{'run':38s} {'CPU s/step':>10s} {'vs mace':>8s} {'wall s/step':>11s} {'structures/s':>13s} "
        f"{'vs mace':>8s} {'median step':>11s} {'vs mace':>8s}"
    )
    names = {
        "mace": "mace_run_train (plain)",
        "les": "mace_lr_run_train LES, batched",
        "les-per-graph": "mace_lr_run_train LES, per-graph loop",
    }

    def rel(kind: str, key: str) -> str:
        return f"{100 * (stat[kind][key] / stat['mace'][key] - 1):+7.1f}%"

    for kind in kinds:
        print(
            f"{names[kind]:38s} {stat[kind]['cpu']:10.3f} {rel(kind, 'cpu')} {stat[kind]['wall']:11.3f} "
            f"{32 / stat[kind]['wall']:13.2f} {rel(kind, 'wall')} {stat[kind]['median']:11.3f} "
            f"{rel(kind, 'median')}"
        )
    print(
        "CPU/wall s/step: means over the steps of epochs >= 1 (the same structures in every run); "
        "CPU: process time of mace's take_step, less sensitive to other load than wall time; "
        "median step: median wall time of single steps (different batches in the two runs)"
    )


if __name__ == "__main__":
    main()
