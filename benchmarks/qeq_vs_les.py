"""QEq vs LES vs short-range fine-tuning on nonlocal charge transfer (C10H2 / C10H3+).

Fine-tunes ``data/base_mace.model`` three ways with the same budget, seed and loss through
the command line a user would type (``mace_lr_run_train``), one run after the other:

* ``sr``  — short-range only (no ``--lr_blocks``)
* ``les`` — ``--lr_blocks les`` (charges from local features + Coulomb)
* ``qeq`` — ``--lr_blocks qeq`` (charge equilibration under the total-charge constraint)

on ``data/chain_train.xyz`` / ``chain_valid.xyz`` (see ``data/README.md``: neutral and
protonated polyyne pairs whose far ends are identical), then evaluates each saved model
on ``data/chain_test.xyz`` from ASE and prints a markdown table: energy, force and charge
errors overall and per charge state, plus the far-end (C8, C9, C10) charge difference
between the protonated and the neutral member of each test pair, which a local charge
model cannot produce (reference: about +0.072 e).

    python benchmarks/qeq_vs_les.py              # 60 epochs each: 15-16 min on 1 core
    python benchmarks/qeq_vs_les.py --fast       # 2 epochs, a quarter of the test set
    python benchmarks/qeq_vs_les.py --models qeq --qeq_config '{"fourth_generation": true}' --tag qeq4g

Defaults, the same for the three runs: 60 epochs, lr 0.01, batch 4, energy/force weights
100/10 (as for the base model), mace's EMA (decay 0.99; without it the checkpoint picked by
validation loss carried a 40 meV energy bias in one QEq run), ``--E0s estimated`` (the base
model is 32-42 eV off on these molecules; see data/README.md) and default block options.

Every training and the evaluation run on one thread (``OMP_NUM_THREADS=1``, torch 1 thread):
on a shared 2-core machine oversubscription makes mace training 10-30x slower. Outputs go
to ``benchmarks/results/qeq_vs_les/<tag>/`` (gitignored): one directory per run with mace's
logs and the ``.model`` file, ``summary.md`` (the tables) and ``metrics.json``.
"""

from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"  # one thread everywhere (set before numpy and torch load)
os.environ["MKL_NUM_THREADS"] = "1"
os.environ["OPENBLAS_NUM_THREADS"] = "1"

import argparse
import json
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
FAR_CARBONS = (8, 9, 10)  # chain positions (atoms.arrays["site"]) of the far-end carbons
LABELS = {"sr": "short-range", "les": "LES", "qeq": "QEq"}


def command(name: str, out: Path, args: argparse.Namespace) -> list:
    cmd = [
        sys.executable, "-m", "mace_lr.cli.run_train",
        "--name", name,
        "--foundation_model", str(args.base),
        "--train_file", str(args.train), "--valid_file", str(args.valid),
        "--energy_key", "REF_energy", "--forces_key", "REF_forces",
        "--total_charge_key", "charge",
        "--E0s", args.E0s,
        "--energy_weight", str(args.energy_weight), "--forces_weight", str(args.forces_weight),
        "--max_num_epochs", str(args.epochs), "--batch_size", str(args.batch_size), "--valid_batch_size", "30",
        "--lr", str(args.lr), "--scheduler_patience", "5",
        "--device", "cpu", "--default_dtype", "float64", "--seed", str(args.seed), "--pin_memory", "False",
        "--num_workers", "0",
        "--model_dir", str(out), "--checkpoints_dir", str(out / "checkpoints"),
        "--log_dir", str(out / "logs"), "--results_dir", str(out / "results"), "--work_dir", str(out),
    ]  # fmt: skip
    if args.ema_decay > 0:
        cmd += ["--ema", "--ema_decay", str(args.ema_decay)]
    if name != "sr":
        cmd += ["--lr_blocks", name]
        config = getattr(args, f"{name}_config")
        if config:
            cmd += ["--lr_config", config]
        if args.dipole_weight > 0:
            cmd += ["--dipole_key", "REF_dipole", "--dipole_weight", str(args.dipole_weight)]
    return cmd


def train(name: str, out: Path, args: argparse.Namespace) -> float:
    """One fine-tune through the CLI; returns its wall time (s)."""
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "train.stdout"
    cmd = command(name, out, args)
    (out / "command.txt").write_text(" ".join(cmd) + "\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    t0 = time.perf_counter()
    with open(log_path, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=out)
        seen = -1
        while proc.poll() is None:
            time.sleep(2.0)
            epochs = re.findall(
                r"INFO: Epoch (\d+):.*?RMSE_E_per_atom=\s*(\S+) meV, RMSE_F=\s*(\S+)", _read(log_path)
            )
            if epochs and int(epochs[-1][0]) > seen:
                seen = int(epochs[-1][0])
                print(f"  [{LABELS[name]}] epoch {seen + 1}/{args.epochs}: valid RMSE E {epochs[-1][1]} meV/atom, "
                      f"F {epochs[-1][2]} meV/Å  ({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(
            f"{name} failed (exit {proc.returncode}); end of {log_path}:\n{_read(log_path)[-3000:]}"
        )
    return wall


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def calculator(name: str, path: Path):
    if name == "sr":  # no block: mace_lr_run_train leaves mace's own .model file
        from mace.calculators import MACECalculator

        return MACECalculator(model_paths=str(path), device="cpu", default_dtype="float64")
    import mace_lr

    return mace_lr.MACELRCalculator(model_paths=str(path), device="cpu", default_dtype="float64")


def predict(calc, frames: list) -> list:
    rows = []
    for ref in frames:
        atoms = ref.copy()
        atoms.info = {"charge": int(ref.info["charge"])}
        atoms.calc = calc
        energy = atoms.get_potential_energy()
        rows.append({
            "energy": energy,
            "forces": atoms.get_forces().copy(),
            "charges": np.array(calc.results["charges"]) if "charges" in calc.results else None,
        })  # fmt: skip
    return rows


def rmse(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x)))) if np.size(x) else float("nan")


def metrics(frames: list, pred: list, charges_only: bool = False) -> dict:
    """Errors over `frames`: energies, forces (all atoms, far-end carbons), charges."""
    far = [np.isin(f.arrays["site"], FAR_CARBONS) for f in frames]
    out: dict = {"n": len(frames)}
    if pred[0]["charges"] is not None:
        dq = [p["charges"] - f.arrays["REF_charges"] for f, p in zip(frames, pred)]
        out["q_e"] = rmse(np.concatenate(dq))
        out["q_far_e"] = rmse(np.concatenate([d[m] for d, m in zip(dq, far)]))
    if charges_only:
        return out
    de = np.array([p["energy"] - f.info["REF_energy"] for f, p in zip(frames, pred)])
    n = np.array([len(f) for f in frames])
    df = [p["forces"] - f.arrays["REF_forces"] for f, p in zip(frames, pred)]
    out["E_meV_atom"] = 1000 * rmse(de / n)
    out["E_meV"] = 1000 * rmse(de)
    out["F_meV_A"] = 1000 * rmse(np.concatenate(df))
    out["F_far_meV_A"] = 1000 * rmse(np.concatenate([d[m] for d, m in zip(df, far)]))
    return out


def far_end_shift(frames: list, pred) -> float:
    """Mean over test pairs of the C8-C10 mean charge, protonated minus neutral partner."""
    by_pair: dict = {}
    for i, f in enumerate(frames):
        q = f.arrays["REF_charges"] if pred is None else pred[i]["charges"]
        by_pair.setdefault(int(f.info["pair"]), {})[int(f.info["charge"])] = q[
            np.isin(f.arrays["site"], FAR_CARBONS)
        ]
    shifts = [p[1].mean() - p[0].mean() for p in by_pair.values() if 0 in p and 1 in p]
    return float(np.mean(shifts))


def fmt(x, spec: str) -> str:
    return "–" if x is None or (isinstance(x, float) and np.isnan(x)) else format(x, spec)


def tables(results: dict, frames: list, epochs: int, args) -> str:
    ref_shift = far_end_shift(frames, None)
    lines = [
        f"Test set: {len(frames)} configurations of `{args.test.name}` "
        f"({sum(f.info['charge'] == 0 for f in frames)} C10H2, {sum(f.info['charge'] == 1 for f in frames)} "
        f"C10H3+); fine-tuned {epochs} epochs, lr {args.lr}, seed {args.seed}, E0s `{args.E0s}`, "
        f"weights E {args.energy_weight} / F {args.forces_weight}, "
        + (f"EMA {args.ema_decay}" if args.ema_decay > 0 else "no EMA")
        + (f", dipole {args.dipole_weight}" if args.dipole_weight > 0 else ""),
        "",
        "| model | RMSE E (meV/atom) | RMSE E (meV) | RMSE F (meV/Å) | RMSE F C8–C10 (meV/Å) "
        "| RMSE q (e) | RMSE q C8–C10 (e) | Δq C8–C10 (e) | train wall (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        m = r["all"]
        lines.append(
            f"| {LABELS[name]} | {m['E_meV_atom']:.2f} | {m['E_meV']:.1f} | {m['F_meV_A']:.1f} | "
            f"{m['F_far_meV_A']:.1f} | {fmt(m.get('q_e'), '.4f')} | {fmt(m.get('q_far_e'), '.4f')} | "
            f"{fmt(r.get('far_shift'), '+.4f')} | {fmt(r.get('wall'), '.0f')} |"
        )
    zero = metrics(
        frames, [{"energy": 0.0, "forces": None, "charges": np.zeros(len(f))} for f in frames], True
    )
    lines.append(
        f"| all-zero charges (scale) | | | | | {zero['q_e']:.4f} | {zero['q_far_e']:.4f} | +0.0000 | |"
    )
    lines.append(f"| GFN2-xTB reference | | | | | | | {ref_shift:+.4f} | |")
    lines += [
        "",
        "Per charge state:",
        "",
        "| model | state | n | RMSE E (meV/atom) | RMSE E (meV) | RMSE F (meV/Å) | RMSE F C8–C10 (meV/Å) "
        "| RMSE q (e) | RMSE q C8–C10 (e) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        for state in ("neutral", "protonated"):
            m = r[state]
            lines.append(
                f"| {LABELS[name]} | {state} | {m['n']} | {m['E_meV_atom']:.2f} | {m['E_meV']:.1f} | "
                f"{m['F_meV_A']:.1f} | {m['F_far_meV_A']:.1f} | {fmt(m.get('q_e'), '.4f')} | "
                f"{fmt(m.get('q_far_e'), '.4f')} |"
            )
    for state, charge in (("neutral", 0), ("protonated", 1)):
        sub = [f for f in frames if int(f.info["charge"]) == charge]
        z = metrics(sub, [{"charges": np.zeros(len(f))} for f in sub], True)
        lines.append(
            f"| all-zero charges | {state} | {z['n']} | | | | | {z['q_e']:.4f} | {z['q_far_e']:.4f} |"
        )
    lines += [
        "",
        "Δq C8–C10: mean over test pairs of the far-end carbons' mean charge, protonated minus neutral "
        "partner (identical far-end geometry). LES charges are latent (not fitted to REF_charges); "
        "QEq charges are its equilibrated charges (physical in form, also not fitted here).",
    ]
    for name, r in results.items():
        if r.get("coupling") is not None:
            lines.append(f"{LABELS[name]} coupling γ after training: {r['coupling']:.4f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="2 epochs and every 4th test configuration")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per fine-tune (default 60)")
    parser.add_argument("--models", default="sr,les,qeq", help="comma-separated subset of sr,les,qeq")
    parser.add_argument("--tag", default=None, help="output subdirectory (default: 'fast' or 'default')")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "qeq_vs_les")
    parser.add_argument("--base", type=Path, default=DATA / "base_mace.model")
    parser.add_argument("--train", type=Path, default=DATA / "chain_train.xyz")
    parser.add_argument("--valid", type=Path, default=DATA / "chain_valid.xyz")
    parser.add_argument("--test", type=Path, default=DATA / "chain_test.xyz")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument(
        "--E0s",
        default="estimated",
        help="mace --E0s; 'estimated' (default) corrects the base model's E0s by a least-squares fit of its "
        "errors on the training set; 'foundation' leaves a 32-42 eV offset per molecule",
    )
    parser.add_argument("--energy_weight", type=float, default=100.0)
    parser.add_argument("--forces_weight", type=float, default=10.0)
    parser.add_argument("--ema_decay", type=float, default=0.99, help="mace --ema_decay (0: no EMA)")
    parser.add_argument(
        "--dipole_weight", type=float, default=0.0, help=">0: dipole loss on REF_dipole (blocks)"
    )
    parser.add_argument("--les_config", default=None, help="--lr_config for the LES run (JSON)")
    parser.add_argument("--qeq_config", default=None, help="--lr_config for the QEq run (JSON)")
    parser.add_argument("--skip_training", action="store_true", help="evaluate the models already in --out")
    args = parser.parse_args()
    # the runs happen in their own folders: relative paths are taken from where the user is
    for key in ("out", "base", "train", "valid", "test"):
        setattr(args, key, getattr(args, key).resolve())
    args.epochs = args.epochs or (2 if args.fast else 60)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = sorted(set(names) - set(LABELS))
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {list(LABELS)}")
    out = args.out / (args.tag or ("fast" if args.fast else "default"))
    out.mkdir(parents=True, exist_ok=True)

    import ase.io
    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="The TorchScript type system")  # mace/e3nn model loading
    warnings.filterwarnings("ignore", message="Environment variable TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")

    walls = {}
    t_start = time.perf_counter()
    for name in names:
        if args.skip_training:
            continue
        print(f"fine-tuning {LABELS[name]} ({args.epochs} epochs) ...", flush=True)
        walls[name] = train(name, out / name, args)
        print(f"  {LABELS[name]}: {walls[name]:.0f} s", flush=True)

    test = ase.io.read(args.test, index=":")
    if args.fast:
        test = [f for f in test if int(f.info["pair"]) % 4 == 0]
    results = {}
    t_eval = time.perf_counter()
    for name in names:
        calc = calculator(name, out / name / f"{name}.model")
        pred = predict(calc, test)
        r = {"wall": walls.get(name), "all": metrics(test, pred)}
        for state, charge in (("neutral", 0), ("protonated", 1)):
            idx = [i for i, f in enumerate(test) if int(f.info["charge"]) == charge]
            r[state] = metrics([test[i] for i in idx], [pred[i] for i in idx])
        if pred[0]["charges"] is not None:
            r["far_shift"] = far_end_shift(test, pred)
            block = calc.model.blocks[name]
            r["coupling"] = float(block.gamma().detach())
        results[name] = r
    t_end = time.perf_counter()
    summary = tables(results, test, args.epochs, args)
    trained = "skipped (--skip_training)" if args.skip_training else f"{t_eval - t_start:.0f} s"
    summary += f"\n\nwall time: trainings {trained}, evaluation {t_end - t_eval:.0f} s"
    print("\n" + summary)
    (out / "summary.md").write_text(summary + "\n")
    (out / "metrics.json").write_text(
        json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **results}, indent=1)
    )
    print(f"\nwritten: {out / 'summary.md'}")


if __name__ == "__main__":
    main()
