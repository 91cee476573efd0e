"""Leave-family-out: do the fine-tuned long-range models transfer to molecules never trained on?

Fine-tunes the base model (``data/base_mace.model``, or ``--base``) on the main job's dimers
(``data/dimers_train.xyz`` / ``dimers_valid.xyz``: 11 H/C/N/O molecule and ion families,
3.5–8 Å) five ways with the same budget and seed, through ``mace_lr_run_train``:

* ``sr``   — short-range fine-tuning (no block)
* ``les``  — ``--lr_blocks les`` (unconstrained latent charges)
* ``lesq`` — ``les`` with ``total_charge="learned"`` (charges summing to the total charge)
* ``lesf`` — ``lesq`` with ``charge_groups="fragments"`` (every bonded fragment summing to
  its formal charge, ``atoms.arrays["formal_charges"]`` of the shipped files)
* ``qeq``  — ``--lr_blocks qeq`` (charge equilibration under the total charge)

then evaluates every model from ASE on ``data/leave_family_out_test.xyz`` (GFN2-xTB dimers
at 9–15 Å of families held out of training: new ions H3O+, C(NH2)3+, NO2-, OCN-, OH- and new
polar molecules HCN, CH3CN, HCONH2; see ``data/generate_leave_family_out.py``):

* binding energy E(AB) − E(A) − E(B) (fragments evaluated alone with their formal charges)
  against the reference, RMSE overall and per pair type;
* like-charged pairs at exactly 15 Å: predicted / reference repulsion;
* charge sums of the isolated monomers (held-out and training ions and molecules) and of
  each fragment inside the dimers.

The same figures on the main job's own test split (``data/dimers_test.xyz``) are printed
beside. Recipe (the main job's): ``--E0s foundation``, energy/force weights 100/10, batch 4,
lr 0.01, EMA 0.99, dipole weight 5 on ``REF_dipole`` for the three charge models, LES
smearing 1 Å, qeq defaults.

    python benchmarks/bench_leave_family_out.py                       # 3 seeds x 5 models
    python benchmarks/bench_leave_family_out.py --epochs 20 --seeds 1 --parallel 2
    python benchmarks/bench_leave_family_out.py --fast                # 1 epoch, smoke test
    python benchmarks/bench_leave_family_out.py --base other.model --tag other_base
    python benchmarks/bench_leave_family_out.py --models lesq --tag coupling05 \
        --lesq_config '{"smearing": 1.0, "total_charge": "learned", "coupling_init": 0.5}'

(with ``coupling_init`` 0 the charge-aware coupling closed, γ = 0, in 2 of 3 seeds; measured
tables in ``data/README.md``, "Leave-family-out test set").

Every run uses one thread; ``--parallel`` runs that many trainings at once. Outputs go to
``benchmarks/results/leave_family_out/<tag>/`` (gitignored): one directory per run,
``summary.md`` and ``metrics.json``.
"""

from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"
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
LABELS = {
    "sr": "short-range", "les": "LES", "lesq": "charge-aware LES", "lesf": "fragment-charge LES", "qeq": "QEq",
}  # fmt: skip
BLOCK = {"les": "les", "lesq": "les", "lesf": "les", "qeq": "qeq"}
CONFIG = {
    "les": '{"smearing": 1.0}',
    "lesq": '{"smearing": 1.0, "total_charge": "learned"}',
    "lesf": '{"smearing": 1.0, "total_charge": "learned", "charge_groups": "fragments"}',
    "qeq": None,
}
TYPES = ("ion_pair", "like_pair", "ion_polar", "polar_pair")


def command(name: str, seed: int, out: Path, args) -> list:
    cmd = [
        sys.executable, "-m", "mace_lr.cli.run_train",
        "--name", name, "--foundation_model", str(args.base),
        "--train_file", str(DATA / "dimers_train.xyz"), "--valid_file", str(DATA / "dimers_valid.xyz"),
        "--energy_key", "REF_energy", "--forces_key", "REF_forces", "--total_charge_key", "charge",
        "--E0s", "foundation", "--energy_weight", "100.0", "--forces_weight", "10.0",
        "--max_num_epochs", str(args.epochs), "--batch_size", "4", "--valid_batch_size", "20",
        "--lr", str(args.lr), "--scheduler_patience", "5", "--ema", "--ema_decay", "0.99",
        "--device", "cpu", "--default_dtype", "float64", "--seed", str(seed), "--pin_memory", "False",
        "--num_workers", "0",
        "--model_dir", str(out), "--checkpoints_dir", str(out / "checkpoints"),
        "--log_dir", str(out / "logs"), "--results_dir", str(out / "results"), "--work_dir", str(out),
    ]  # fmt: skip
    if name in BLOCK:
        cmd += [
            "--lr_blocks",
            BLOCK[name],
            "--dipole_key",
            "REF_dipole",
            "--dipole_weight",
            str(args.dipole_weight),
        ]
        if CONFIG[name]:
            cmd += ["--lr_config", CONFIG[name]]
    return cmd


def train_all(runs: list, args) -> dict:
    """Run the (name, seed, dir) trainings, ``args.parallel`` at a time; returns wall times."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    pending, active, walls = list(runs), {}, {}
    while pending or active:
        while pending and len(active) < args.parallel:
            name, seed, out = pending.pop(0)
            if (out / f"{name}.model").exists() and not args.retrain:
                print(f"  {LABELS[name]} seed {seed}: model exists, not retrained", flush=True)
                continue
            out.mkdir(parents=True, exist_ok=True)
            cmd = command(name, seed, out, args)
            (out / "command.txt").write_text(" ".join(cmd) + "\n")
            fh = open(out / "train.stdout", "w")
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=out)
            active[(name, seed)] = (proc, fh, out, time.perf_counter())
            print(f"  started {LABELS[name]} seed {seed}", flush=True)
        time.sleep(5.0)
        for key, (proc, fh, out, t0) in list(active.items()):
            if proc.poll() is None:
                continue
            fh.close()
            del active[key]
            walls[key] = time.perf_counter() - t0
            log = (out / "train.stdout").read_text(errors="replace")
            if proc.returncode != 0:
                raise SystemExit(f"{key} failed (exit {proc.returncode}); end of log:\n{log[-3000:]}")
            epochs = re.findall(r"INFO: Epoch (\d+):.*?RMSE_E_per_atom=\s*(\S+) meV", log)
            last = f", last valid RMSE E {epochs[-1][1]} meV/atom" if epochs else ""
            print(f"  done {LABELS[key[0]]} seed {key[1]}: {walls[key]:.0f} s{last}", flush=True)
    return walls


def load_model(name: str, path: Path):
    import torch

    if name == "sr":  # mace's own .model file (no block)
        return torch.load(str(path), map_location="cpu", weights_only=False).double()
    import mace_lr

    return mace_lr.load(str(path), device="cpu")


def predict(model, structures: list, chunk: int = 16) -> tuple:
    """Energies [n] and per-structure charges (None without a charge block), batched."""
    from mace_lr.testing import evaluate

    energies, charges = [], []
    for k in range(0, len(structures), chunk):
        part = structures[k : k + chunk]
        out = evaluate(model, part, compute_force=False)
        energies += [float(e) for e in out["energy"]]
        q = out.get("charges")
        bounds = np.cumsum([0] + [len(a) for a in part])
        for g in range(len(part)):
            charges.append(None if q is None else q[bounds[g] : bounds[g + 1]].cpu().numpy())
    return np.array(energies), charges


def _with_charge(atoms, charge: int):
    atoms = atoms.copy()
    atoms.info = {"charge": int(charge)}
    return atoms


def evaluate_dimers(model, frames: list, has_charges: bool) -> list:
    """Binding energies and fragment charge sums (in the dimer and alone) of each dimer."""
    dimers, parts_a, parts_b, formal = [], [], [], []
    for f in frames:
        frag = f.arrays["fragment"]
        qa = int(f.info.get("charge_A", round(f.info["REF_charge_A"])))
        qb = int(f.info.get("charge_B", round(f.info["REF_charge_B"])))
        dimers.append(_with_charge(f, qa + qb))
        parts_a.append(_with_charge(f[frag == 0], qa))
        parts_b.append(_with_charge(f[frag == 1], qb))
        formal.append((qa, qb))
    e_ab, q_ab = predict(model, dimers)
    e_a, q_a = predict(model, parts_a)
    e_b, q_b = predict(model, parts_b)
    rows = []
    for k, f in enumerate(frames):
        frag = f.arrays["fragment"]
        qa, qb = formal[k]
        row = {"binding": float(e_ab[k] - e_a[k] - e_b[k]), "ref": f.info["REF_binding_energy"]}
        row["type"] = f.info["config_type"]
        if has_charges:
            row["dq_in_dimer"] = float(
                max(abs(q_ab[k][frag == 0].sum() - qa), abs(q_ab[k][frag == 1].sum() - qb))
            )
            row["dq_alone"] = float(max(abs(q_a[k].sum() - qa), abs(q_b[k].sum() - qb)))
        rows.append(row)
    return rows


def rmse(x) -> float:
    x = np.asarray(x, float)
    return float(np.sqrt(np.mean(x**2))) if x.size else float("nan")


def dimer_metrics(rows: list) -> dict:
    out = {}
    main = [r for r in rows if r["type"] != "like_15"]
    out["bind_rmse_meV"] = 1000 * rmse([r["binding"] - r["ref"] for r in main])
    for t in TYPES:
        sub = [r for r in main if r["type"] == t]
        if sub:
            out[f"bind_rmse_meV_{t}"] = 1000 * rmse([r["binding"] - r["ref"] for r in sub])
    like = [r for r in rows if r["type"] == "like_15"]
    if like:
        ratio = np.array([r["binding"] / r["ref"] for r in like])
        out["like15_ratio_mean"] = float(ratio.mean())
        out["like15_ratio_min"] = float(ratio.min())
        out["like15_ratio_max"] = float(ratio.max())
        out["like15_within_10pct"] = float(np.mean(np.abs(ratio - 1) <= 0.10))
    if "dq_in_dimer" in rows[0]:
        out["frag_dq_in_dimer_max"] = float(max(r["dq_in_dimer"] for r in rows))
        out["frag_dq_in_dimer_rms"] = rmse([r["dq_in_dimer"] for r in rows])
        out["frag_dq_alone_max"] = float(max(r["dq_alone"] for r in rows))
    return out


def monomer_sums(model, frames: list) -> dict:
    structures = [_with_charge(f, int(f.info["charge"])) for f in frames]
    _, charges = predict(model, structures)
    return {f.info["name"]: (int(f.info["charge"]), float(q.sum())) for f, q in zip(frames, charges)}


def evaluate_run(name: str, path: Path, test: list, main_test: list, monomers: list) -> dict:
    """Metrics of one trained model (cached in ``eval.json`` beside it)."""
    cache = path.parent / "eval.json"
    if cache.exists() and cache.stat().st_mtime > path.stat().st_mtime:
        return json.loads(cache.read_text())
    model = load_model(name, path)
    charged = name != "sr"
    r = {"lfo": dimer_metrics(evaluate_dimers(model, test, charged))}
    r["main"] = dimer_metrics(evaluate_dimers(model, main_test, charged))
    if charged:
        r["monomers"] = monomer_sums(model, monomers)
        r["gamma"] = float(model.blocks[BLOCK[name]].gamma().detach())
    cache.write_text(json.dumps(r, indent=1))
    return r


def _stat(values) -> str:
    values = [v for v in values if v is not None and np.isfinite(v)]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.0f}"
    return f"{np.mean(values):.0f} ± {np.std(values):.0f}"


def tables(results: dict, names: list, seeds: list, args, n_test: dict) -> str:
    lines = [
        f"Base `{args.base}`; {args.epochs} epochs, lr {args.lr}, seeds {seeds}; held-out test: "
        + ", ".join(f"{k} {v}" for k, v in n_test.items()),
        "",
        "Binding-energy RMSE (meV) at 9–15 Å, held-out families (mean ± std over seeds; per seed in metrics.json):",
        "",
        "| model | all | "
        + " | ".join(t for t in TYPES if f"bind_rmse_meV_{t}" in _any(results))
        + " | main split (dimers_test) |",
    ]
    cols = [t for t in TYPES if f"bind_rmse_meV_{t}" in _any(results)]
    lines.append("|---" * (3 + len(cols)) + "|")
    for name in names:
        rs = [results[(name, s)] for s in seeds if (name, s) in results]
        row = [_stat([r["lfo"]["bind_rmse_meV"] for r in rs])]
        row += [_stat([r["lfo"].get(f"bind_rmse_meV_{t}") for r in rs]) for t in cols]
        row.append(_stat([r["main"]["bind_rmse_meV"] for r in rs]))
        lines.append(f"| {LABELS[name]} | " + " | ".join(row) + " |")
    lines += ["", "Ratio to short-range, per seed (binding RMSE, held-out 9–15 Å / main split):", ""]
    for name in names:
        if name == "sr":
            continue
        parts = []
        for s in seeds:
            if (name, s) in results and ("sr", s) in results:
                a, b = results[("sr", s)], results[(name, s)]
                parts.append(
                    f"seed {s}: {a['lfo']['bind_rmse_meV'] / b['lfo']['bind_rmse_meV']:.1f}× / "
                    f"{a['main']['bind_rmse_meV'] / b['main']['bind_rmse_meV']:.1f}×"
                )
        lines.append(f"- {LABELS[name]}: " + "; ".join(parts))
    lines += [
        "",
        "Like-charged pairs at 15 Å: predicted / reference repulsion (mean [min, max]; share within 10 %):",
        "",
    ]
    for name in names:
        parts = []
        for s in seeds:
            r = results.get((name, s))
            if r and "like15_ratio_mean" in r["lfo"]:
                m = r["lfo"]
                parts.append(
                    f"seed {s}: {m['like15_ratio_mean']:.3f} [{m['like15_ratio_min']:.3f}, "
                    f"{m['like15_ratio_max']:.3f}], {100 * m['like15_within_10pct']:.0f} %"
                )
        lines.append(f"- {LABELS[name]}: " + "; ".join(parts))
    lines += ["", "Charge sums of isolated monomers, Σq − Q (e), each model's first trained seed:", ""]
    charge_models = [n for n in names if n != "sr"]
    mono = {}
    for n in charge_models:
        done = [s for s in seeds if (n, s) in results]
        if done:
            mono[n] = results[(n, done[0])]["monomers"]
    if mono:
        first = next(iter(mono.values()))
        lines.append("| monomer | Q | " + " | ".join(LABELS[n] for n in mono) + " |")
        lines.append("|---" * (2 + len(mono)) + "|")
        for m, (q, _) in first.items():
            lines.append(f"| {m} | {q:+d} | " + " | ".join(f"{mono[n][m][1] - q:+.2e}" for n in mono) + " |")
        lines += ["", "max |Σq − Q| over isolated monomers, per seed:", ""]
        for n in charge_models:
            vals = []
            for s in seeds:
                r = results.get((n, s))
                if r:
                    vals.append(max(abs(v - q) for q, v in r["monomers"].values()))
            lines.append(f"- {LABELS[n]}: " + ", ".join(f"{v:.2e}" for v in vals))
        lines += [
            "",
            "Fragment charges inside the held-out dimers, max (rms) |Σ_F q − Q_F| (e), per seed:",
            "",
        ]
        for n in charge_models:
            vals = []
            for s in seeds:
                r = results.get((n, s))
                if r and "frag_dq_in_dimer_max" in r["lfo"]:
                    vals.append(
                        f"{r['lfo']['frag_dq_in_dimer_max']:.3f} ({r['lfo']['frag_dq_in_dimer_rms']:.3f})"
                    )
            lines.append(f"- {LABELS[n]}: " + ", ".join(vals))
        lines += ["", "Coupling γ after training, per seed:", ""]
        for n in charge_models:
            vals = [f"{results[(n, s)]['gamma']:.3f}" for s in seeds if (n, s) in results]
            lines.append(f"- {LABELS[n]}: " + ", ".join(vals))
    return "\n".join(lines)


def _any(results: dict) -> dict:
    keys: dict = {}
    for r in results.values():
        keys.update(r["lfo"])
    return keys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, default=DATA / "base_mace.model")
    parser.add_argument("--models", default="sr,les,lesq,lesf,qeq")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per fine-tune (default 20)")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--dipole_weight", type=float, default=5.0)
    parser.add_argument("--lesq_config", default=CONFIG["lesq"], help="--lr_config of the charge-aware run")
    parser.add_argument(
        "--lesf_config", default=CONFIG["lesf"], help="--lr_config of the fragment-charge run"
    )
    parser.add_argument("--parallel", type=int, default=1, help="trainings at once (one thread each)")
    parser.add_argument("--fast", action="store_true", help="1 epoch, one seed (smoke test)")
    parser.add_argument("--tag", default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "leave_family_out")
    parser.add_argument("--retrain", action="store_true", help="train again even where a model exists")
    parser.add_argument("--skip_training", action="store_true", help="only evaluate the models in --out")
    args = parser.parse_args()
    CONFIG["lesq"] = args.lesq_config
    CONFIG["lesf"] = args.lesf_config
    args.epochs = args.epochs or (1 if args.fast else 20)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    bad = sorted(set(names) - set(LABELS))
    if bad:
        parser.error(f"unknown model(s) {bad}; choose from {list(LABELS)}")
    seeds = [1] if args.fast else [int(s) for s in args.seeds.split(",")]
    out = args.out / (args.tag or ("fast" if args.fast else "default"))
    out.mkdir(parents=True, exist_ok=True)

    import ase.io
    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="The TorchScript type system")
    warnings.filterwarnings("ignore", message="Environment variable TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")

    # the short-range and charge-aware runs of every seed first (the headline comparison)
    head = ("sr", "lesf", "lesq")
    order = [n for n in head if n in names] + [n for n in names if n not in head]
    first, rest = order[: sum(n in head for n in names)], order[sum(n in head for n in names) :]
    runs = [(n, s, out / f"{n}_s{s}") for group in (first, rest) for s in seeds for n in group]
    t0 = time.perf_counter()
    walls = {} if args.skip_training else train_all(runs, args)
    t_train = time.perf_counter() - t0

    test = ase.io.read(DATA / "leave_family_out_test.xyz", index=":")
    main_test = ase.io.read(DATA / "dimers_test.xyz", index=":")
    monomers = ase.io.read(DATA / "leave_family_out_monomers.xyz", index=":")
    monomers += ase.io.read(DATA / "monomers.xyz", index=":")
    n_test = {
        t: sum(f.info["config_type"] == t for f in test)
        for t in dict.fromkeys(f.info["config_type"] for f in test)
    }
    results = {}
    t1 = time.perf_counter()
    for name, seed, d in runs:
        path = d / f"{name}.model"
        if not path.exists():
            continue
        r = evaluate_run(name, path, test, main_test, monomers)
        r["wall"] = walls.get((name, seed))
        results[(name, seed)] = r
        print(f"  evaluated {LABELS[name]} seed {seed}: held-out binding RMSE {r['lfo']['bind_rmse_meV']:.0f} meV, "
              f"main split {r['main']['bind_rmse_meV']:.0f} meV", flush=True)  # fmt: skip
    summary = tables(results, names, seeds, args, n_test)
    summary += f"\n\nwall time: trainings {t_train:.0f} s (parallel {args.parallel}), evaluation {time.perf_counter() - t1:.0f} s"
    print("\n" + summary)
    (out / "summary.md").write_text(summary + "\n")
    (out / "metrics.json").write_text(
        json.dumps(
            {"args": {k: str(v) for k, v in vars(args).items()},
             "results": {f"{n}_s{s}": r for (n, s), r in results.items()}},
            indent=1,
        )
    )  # fmt: skip
    print(f"\nwritten: {out / 'summary.md'}")


if __name__ == "__main__":
    main()
