"""Wannier centroids: fine-tune a ``wannier`` block on water clusters and check its electrons.

The ``wannier`` block (DPLR-like) keeps the ions of water at their nuclei (O +6, H +1) and
puts the eight valence electrons of each oxygen on one learned point, the centroid of its
four Wannier centres, displaced from the oxygen by an equivariant vector. The dipole, the
polarization of a periodic cell and the Born charges follow from where those centroids
sit; the ions and centroids interact through the Coulomb law.

What it does (on ``data/wannier_*.xyz``: water monomers to tetramers, B3LYP energies,
forces, dipoles and Boys-localised Wannier centroids from PySCF, see ``data/README.md``):

1. fine-tunes ``data/base_mace.model`` with the block twice, side by side, through the
   command line a user would type::

       mace_lr_run_train --foundation_model data/base_mace.model --lr_blocks wannier \\
           --lr_config '{"centroid_electrons": {"O": 8}}' --E0s average \\
           --train_file data/wannier_train.xyz --energy_key REF_energy --forces_key REF_forces \\
           --dipole_key REF_dipole --dipole_weight 10 \\
           --wannier_centroids_key REF_wannier_centroids --wannier_centroids_weight 100 ...

   once with the centroids as explicit targets (above) and once implicitly, from the
   dipoles alone (no ``--wannier_centroids_*``);
2. evaluates both from ASE (``MACELRCalculator``) on the held-out clusters
   (``data/wannier_test.xyz``): centroid positions, dipoles, and the energy and force
   errors, next to a freshly attached block (centroids on the oxygens, i.e. the formal
   charges O −2, H +1) and to the spread of the data;
3. writes ``parity.png`` and ``summary.txt``.

    python tutorials/04_wannier_centroids.py          # about 4 minutes on 2 CPU cores
    python tutorials/04_wannier_centroids.py --fast   # about a minute (used by the tests)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
CONFIG = '{"centroid_electrons": {"O": 8}, "smearing": 1.0}'


def _command(name: str, out: Path, epochs: int, explicit: bool, args) -> list:
    cmd = [
        sys.executable, "-m", "mace_lr.cli.run_train",
        "--name", name,
        "--foundation_model", str(args.base),
        "--train_file", str(args.train), "--valid_file", str(args.valid),
        "--energy_key", "REF_energy", "--forces_key", "REF_forces",
        "--E0s", "average",
        "--lr_blocks", "wannier", "--lr_config", CONFIG,
        "--energy_weight", "10.0", "--forces_weight", "10.0",
        "--dipole_key", "REF_dipole", "--dipole_weight", "10.0",
        "--max_num_epochs", str(epochs), "--batch_size", "4", "--valid_batch_size", "16",
        "--lr", str(args.lr), "--scheduler_patience", "5", "--ema", "--ema_decay", "0.99",
        "--device", "cpu", "--default_dtype", "float64", "--seed", str(args.seed), "--pin_memory", "False",
        "--model_dir", str(out), "--checkpoints_dir", str(out / "checkpoints"),
        "--log_dir", str(out / "logs"), "--results_dir", str(out / "results"), "--work_dir", str(out),
    ]  # fmt: skip
    if explicit:
        cmd += ["--wannier_centroids_key", "REF_wannier_centroids", "--wannier_centroids_weight", "100.0"]
    return cmd


def predict(calc, frames):
    """Energies, forces, dipoles and centroid displacements W_O - R_O of every structure."""
    out = {"energy": [], "forces": [], "dipole": [], "displacement": []}
    for atoms in frames:
        atoms = atoms.copy()
        atoms.calc = calc
        calc.calculate(atoms, ["energy", "forces"])
        oxygen = atoms.numbers == 8
        out["energy"].append(calc.results["energy"])
        out["forces"].append(calc.results["forces"])
        out["dipole"].append(calc.results["dipole"])
        out["displacement"].append(calc.results["wannier_centroids"][oxygen] - atoms.positions[oxygen])
    return {k: np.concatenate(v) if k in ("forces", "displacement") else np.array(v) for k, v in out.items()}


def references(frames):
    oxygen = [a.numbers == 8 for a in frames]
    return {
        "energy": np.array([a.info["REF_energy"] for a in frames]),
        "forces": np.concatenate([a.arrays["REF_forces"] for a in frames]),
        "dipole": np.array([a.info["REF_dipole"] for a in frames]),
        "displacement": np.concatenate(
            [a.arrays["REF_wannier_centroids"][o] - a.positions[o] for a, o in zip(frames, oxygen)]
        ),
    }


def rmse(a, b) -> float:
    return float(np.sqrt(np.mean((np.asarray(a) - np.asarray(b)) ** 2)))


def spread(ref) -> float:
    ref = np.asarray(ref)
    return float(np.sqrt(np.mean((ref - ref.mean(axis=0)) ** 2)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="small budget (for tests)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "wannier_out")
    parser.add_argument("--base", type=Path, default=DATA / "base_mace.model")
    parser.add_argument("--train", type=Path, default=DATA / "wannier_train.xyz")
    parser.add_argument("--valid", type=Path, default=DATA / "wannier_valid.xyz")
    parser.add_argument("--test", type=Path, default=DATA / "wannier_test.xyz")
    parser.add_argument("--lr", type=float, default=0.005)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="threads for the evaluation")
    args = parser.parse_args()
    # the runs happen in their own folders: relative paths are taken from where the user is
    for key in ("out", "base", "train", "valid", "test"):
        setattr(args, key, getattr(args, key).resolve())
    epochs = args.epochs or (2 if args.fast else 40)
    args.out.mkdir(parents=True, exist_ok=True)

    import ase.io
    import torch

    torch.set_num_threads(args.threads)
    from _progress import run_with_progress

    import mace_lr

    t0 = time.perf_counter()
    runs = {
        "water_explicit": (_command("water_explicit", args.out, epochs, True, args), "centroids + dipoles"),
        "water_implicit": (_command("water_implicit", args.out, epochs, False, args), "dipoles only       "),
    }
    run_with_progress(runs, args.out, epochs)
    print(f"fine-tuning took {time.perf_counter() - t0:.0f} s")

    test = ase.io.read(args.test, index=":")
    if args.fast:
        test = test[::4]
    ref = references(test)
    base = torch.load(args.base, map_location="cpu", weights_only=False)  # the shipped pickled MACE
    fresh = mace_lr.augment(base, "wannier", centroid_electrons={"O": 8})
    models = {
        "fresh block (formal charges)": fresh,
        "fine-tuned, dipoles only": str(args.out / "water_implicit.model"),
        "fine-tuned, centroids + dipoles": str(args.out / "water_explicit.model"),
    }
    results = {
        name: predict(mace_lr.MACELRCalculator(model_paths=m, device="cpu"), test)
        for name, m in models.items()
    }

    n_atoms = np.array([len(a) for a in test])
    lines = [
        f"held-out: {len(test)} water clusters ({sum(int((a.numbers == 8).sum()) for a in test)} oxygens); "
        f"{epochs} epochs per fine-tune",
        f"spread of the data: |W-R| {np.linalg.norm(ref['displacement'], axis=1).mean():.3f} Å on average, "
        f"dipole components {spread(ref['dipole']):.3f} e·Å",
        f"{'model':<32} {'W (Å)':>8} {'|W-R| (Å)':>10} {'μ (e·Å)':>9} {'E (meV/atom)':>13} {'F (meV/Å)':>10}",
    ]
    for name, r in results.items():
        e = (r["energy"] - ref["energy"]) / n_atoms
        e = e - e.mean() if name.startswith("fresh") else e  # the fresh block keeps the base's E0s
        lines.append(
            f"{name:<32} {rmse(r['displacement'], ref['displacement']):8.4f} "
            f"{rmse(np.linalg.norm(r['displacement'], axis=1), np.linalg.norm(ref['displacement'], axis=1)):10.4f} "
            f"{rmse(r['dipole'], ref['dipole']):9.4f} {1e3 * float(np.sqrt(np.mean(e**2))):13.1f} "
            f"{1e3 * rmse(r['forces'], ref['forces']):10.1f}"
        )
    lines.append(
        "(W: centroid position error per component; the fresh block's energy error is after removing its mean)"
    )
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
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    for name, style in zip(results, ("s", "^", "o")):
        r = results[name]
        axes[0].plot(
            ref["displacement"].ravel(), r["displacement"].ravel(), style, ms=3, alpha=0.6, label=name
        )
        axes[1].plot(ref["dipole"].ravel(), r["dipole"].ravel(), style, ms=3, alpha=0.6, label=name)
    for ax, what in zip(axes, ("centroid displacement W_O - R_O (Å)", "dipole (e·Å)")):
        lim = ax.get_xlim()
        ax.plot(lim, lim, "k-", lw=0.5)
        ax.set_xlabel(f"B3LYP/Boys {what}")
        ax.set_ylabel(f"model {what}")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out / "parity.png", dpi=120)
    print(f"plot: {args.out / 'parity.png'}")


if __name__ == "__main__":
    main()
