"""Cumulene torsion barriers: short-range, LES and LOREM-style messages with the same budget.

H2C=C=...=C=CH2 (n = 5 ... 12 carbons): the energy depends on the torsion between the two
terminal CH2 planes (a ~1 eV barrier; planar minimum for even n, perpendicular for odd n),
but for the longer chains the two groups are farther apart than the base model's receptive
field (2 x 4.5 A). The script

1. fine-tunes ``data/base_mace.model`` on ``data/cumulene_train.xyz`` three times with the
   same budget through ``mace_lr_run_train``: no block (short-range), ``--lr_blocks les``
   and ``--lr_blocks lorem``;
2. evaluates the three models from ASE on the held-out torsion profiles
   ``data/cumulene_test.xyz`` (torsion 0, 10, ..., 90 degrees at every length);
3. prints the RMSE of the torsion profile E(theta) - E(0) per length side by side and
   writes ``torsion_profiles.png`` and ``summary.txt``.

The base's E0s are several eV off for these molecules, so the fine-tunes start from mace's
``--E0s estimated`` (least-squares correction on the training set). The sign of the barrier
alternates with n: trained on all lengths, a model that cannot tell the parity of the chain
at its ends learns the nearly flat mean; ``--lengths 6 8 10 12`` trains and tests on one
parity, where lorem's local l = 2 harmonics (the CH2 plane) and its l = 2 potentials can
carry the barrier beyond the receptive field. Results and plots: data/README.md
("Fine-tuning on it") and docs/figures/lorem_cumulenes_*.png.

    python tutorials/07_lorem_cumulenes.py          # full run (see data/README.md for the time)
    python tutorials/07_lorem_cumulenes.py --epochs 40 --energy_weight 1000 --forces_weight 10 \
        --lengths 6 8 10 12                         # even chains only
    python tutorials/07_lorem_cumulenes.py --fast   # one epoch (used by the tests)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
BLOCKS = {
    "short-range": None,
    "LES": ("les", '{"smearing": 1.0}'),
    "lorem": ("lorem", '{"l_max": 2, "channels": 8, "smearing": 1.0}'),
}


def _command(name: str, block, out: Path, epochs: int, args) -> list:
    cmd = [
        sys.executable, "-m", "mace_lr.cli.run_train",
        "--name", name,
        "--foundation_model", str(args.base),
        "--train_file", str(args.train), "--valid_file", str(args.valid),
        "--energy_key", "REF_energy", "--forces_key", "REF_forces",
        "--total_charge_key", "charge",
        "--E0s", args.e0s,
        "--energy_weight", str(args.energy_weight), "--forces_weight", str(args.forces_weight),
        "--max_num_epochs", str(epochs), "--batch_size", "8", "--valid_batch_size", "16",
        "--lr", str(args.lr), "--scheduler_patience", "5", "--ema", "--ema_decay", "0.99",
        "--device", "cpu", "--default_dtype", "float64", "--seed", str(args.seed), "--pin_memory", "False",
        "--model_dir", str(out), "--checkpoints_dir", str(out / "checkpoints"),
        "--log_dir", str(out / "logs"), "--results_dir", str(out / "results"), "--work_dir", str(out),
    ]  # fmt: skip
    if block is not None:
        cmd += ["--lr_blocks", block[0], "--lr_config", block[1]]
    return cmd


def profile_errors(frames, energies) -> dict:
    """RMSE (meV) of E(theta) - E(0) per chain length, and of the absolute energy."""
    ref = np.array([a.info["REF_energy"] for a in frames])
    lengths = np.array([a.info["n_carbon"] for a in frames])
    torsion = np.array([a.info["torsion"] for a in frames])
    out = {}
    for n in sorted(set(lengths.tolist())):
        idx = np.flatnonzero(lengths == n)
        zero = idx[np.argmin(torsion[idx])]
        d_ref = ref[idx] - ref[zero]
        d_pred = energies[idx] - energies[zero]
        out[n] = {
            "profile": 1000 * np.sqrt(np.mean((d_pred - d_ref) ** 2)),
            "energy": 1000 * np.sqrt(np.mean((energies[idx] - ref[idx]) ** 2)),
            "barrier_ref": float(d_ref[np.argmax(np.abs(d_ref))]),
            "barrier_pred": float(d_pred[np.argmax(np.abs(d_ref))]),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="one epoch, subsampled data (for tests)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "lorem_cumulenes_out")
    parser.add_argument("--base", type=Path, default=DATA / "base_mace.model")
    parser.add_argument("--train", type=Path, default=DATA / "cumulene_train.xyz")
    parser.add_argument("--valid", type=Path, default=DATA / "cumulene_valid.xyz")
    parser.add_argument("--test", type=Path, default=DATA / "cumulene_test.xyz")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--e0s", default="estimated", help="mace --E0s (default: estimated from the base)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--energy_weight", type=float, default=1000.0)
    parser.add_argument("--forces_weight", type=float, default=10.0)
    parser.add_argument(
        "--lengths",
        type=int,
        nargs="+",
        default=None,
        help="chain lengths to train and test on (default all)",
    )
    parser.add_argument("--threads", type=int, default=2, help="threads for the evaluation")
    args = parser.parse_args()
    # the runs happen in their own folders: relative paths are taken from where the user is
    for key in ("out", "base", "train", "valid", "test"):
        setattr(args, key, getattr(args, key).resolve())
    epochs = args.epochs or (1 if args.fast else 40)
    args.out.mkdir(parents=True, exist_ok=True)

    import ase.io
    import torch

    if args.fast:  # an eighth of the data, same distribution
        for key in ("train", "valid"):
            frames = ase.io.read(getattr(args, key), index="::8")
            path = args.out / f"{key}_fast.xyz"
            ase.io.write(path, frames, format="extxyz")
            setattr(args, key, path)

    if args.lengths:  # e.g. one parity: the sign of the barrier alternates with n
        for key in ("train", "valid", "test"):
            frames = [
                a for a in ase.io.read(getattr(args, key), index=":") if a.info["n_carbon"] in args.lengths
            ]
            path = args.out / f"{key}_lengths.xyz"
            ase.io.write(path, frames, format="extxyz")
            setattr(args, key, path)

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _progress import run_with_progress

    t0 = time.perf_counter()
    runs = {}
    for label, block in BLOCKS.items():
        name = "cumulene_" + label.replace("-", "_").lower()
        runs[name] = (_command(name, block, args.out, epochs, args), f"{label:<12}")
    run_with_progress(runs, args.out, epochs)
    print(f"fine-tuning took {time.perf_counter() - t0:.0f} s")

    torch.set_num_threads(args.threads)
    from mace.calculators import MACECalculator

    import mace_lr

    test = ase.io.read(args.test, index=":")
    if args.fast:
        test = [a for a in test if a.info["n_carbon"] in (5, 12)]
    results = {}
    for (label, _), name in zip(BLOCKS.items(), runs):
        path = str(args.out / f"{name}.model")
        if label == "short-range":  # plain fine-tuned MACE
            calc = MACECalculator(model_paths=path, device="cpu", default_dtype="float64")
        else:
            calc = mace_lr.MACELRCalculator(model_paths=path, device="cpu", default_dtype="float64")
        energies = []
        for atoms in test:
            atoms = atoms.copy()
            atoms.calc = calc
            energies.append(atoms.get_potential_energy())
        results[label] = np.array(energies)
    errs = {label: profile_errors(test, e) for label, e in results.items()}
    lengths = sorted(errs["lorem"])
    lines = [
        f"held-out torsion profiles (0-90 deg, {len(test)} structures), {epochs} epochs each, "
        "RMSE of E(theta) - E(0) in meV",
        f"{'n_C':>4} {'barrier (eV)':>13} " + " ".join(f"{label:>12}" for label in BLOCKS),
    ]
    for n in lengths:
        lines.append(
            f"{n:4d} {errs['lorem'][n]['barrier_ref']:13.3f} "
            + " ".join(f"{errs[label][n]['profile']:12.1f}" for label in BLOCKS)
        )
    lines.append(
        f"{'all':>4} {'':>13} "
        + " ".join(
            f"{np.sqrt(np.mean([errs[lb][n]['profile'] ** 2 for n in lengths])):12.1f}" for lb in BLOCKS
        )
    )
    lines.append("absolute energy RMSE per length (meV)")
    for n in lengths:
        lines.append(f"{n:4d} {'':>13} " + " ".join(f"{errs[label][n]['energy']:12.1f}" for label in BLOCKS))
    summary = "\n".join(lines)
    print("\n" + summary)
    (args.out / "summary.txt").write_text(summary + "\n")

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    cols = 4
    rows = (len(lengths) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False)
    ref = np.array([a.info["REF_energy"] for a in test])
    nc = np.array([a.info["n_carbon"] for a in test])
    tor = np.array([a.info["torsion"] for a in test])
    for ax, n in zip(axes.flat, lengths):
        idx = np.flatnonzero(nc == n)
        idx = idx[np.argsort(tor[idx])]
        ax.plot(tor[idx], ref[idx] - ref[idx[0]], "ko", label="GFN2-xTB")
        for (label, e), style in zip(results.items(), ("s-", "^-", "v-")):
            ax.plot(tor[idx], e[idx] - e[idx[0]], style, ms=4, lw=1, label=label, alpha=0.8)
        ax.set_title(f"C{n}H4")
        ax.set_xlabel("torsion (deg)")
        ax.set_ylabel("E - E(0) (eV)")
    axes.flat[0].legend(fontsize=7)
    for ax in list(axes.flat)[len(lengths) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(args.out / "torsion_profiles.png", dpi=110)
    print(f"plot: {args.out / 'torsion_profiles.png'}")


if __name__ == "__main__":
    main()
