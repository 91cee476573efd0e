"""Field-coupled fine-tuning: learn U(R, E) and get dipoles, Born charges and polarizabilities.

What it does (on ``data/field_*.xyz``, GFN2-xTB molecules in applied fields, see
``data/README.md``):

1. fine-tunes ``data/base_mace.model`` with a ``field`` block through the command line a
   user would type, on energies and forces *in the field* plus dipoles, Born effective
   charges and polarizabilities::

       mace_lr_run_train --foundation_model data/base_mace.model --lr_blocks field \\
           --train_file data/field_train.xyz --energy_key REF_energy --forces_key REF_forces \\
           --dipole_key REF_dipole --born_charges_key REF_born_charges --born_charges_weight 10 \\
           --polarizability_key REF_polarizability --polarizability_weight 100 ...

   (the applied field of each structure is read from ``atoms.info["external_field"]``);
2. evaluates the base and the fine-tuned model from ASE (``MACELRCalculator``) on the
   held-out ``data/field_test.xyz``: errors of U, F, μ, Z and α against the spread of the
   data (the error a model that predicts the mean would make);
3. runs a short NVE trajectory of a water molecule in a 0.3 V/Å field from ASE, with the
   field in the forces and μ and Z reported at every step, and checks energy conservation;
4. writes ``parity.png`` (predicted vs reference μ, Z, α) and ``summary.txt``.

    python tutorials/03_field_response.py          # about 6 minutes on 2 CPU cores
    python tutorials/03_field_response.py --fast   # about a minute (used by the tests)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"


def fine_tune(out: Path, epochs: int, args) -> Path:
    """``mace_lr_run_train --lr_blocks field`` with a progress bar over epochs."""
    cmd = [
        sys.executable, "-m", "mace_lr.cli.run_train",
        "--name", "water_field",
        "--foundation_model", str(args.base),
        "--train_file", str(args.train), "--valid_file", str(args.valid),
        "--energy_key", "REF_energy", "--forces_key", "REF_forces",
        "--E0s", "foundation",
        "--lr_blocks", "field", "--lr_config", '{"num_vectors": 8, "order": 3}',
        "--energy_weight", "10.0", "--forces_weight", "10.0",
        "--dipole_key", "REF_dipole", "--dipole_weight", "10.0",
        "--born_charges_key", "REF_born_charges", "--born_charges_weight", "10.0",
        "--polarizability_key", "REF_polarizability", "--polarizability_weight", "100.0",
        "--max_num_epochs", str(epochs), "--batch_size", "5", "--valid_batch_size", "16",
        "--lr", str(args.lr), "--scheduler_patience", "5", "--ema", "--ema_decay", "0.99",
        "--device", "cpu", "--default_dtype", "float64", "--seed", str(args.seed), "--pin_memory", "False",
        "--model_dir", str(out), "--checkpoints_dir", str(out / "checkpoints"),
        "--log_dir", str(out / "logs"), "--results_dir", str(out / "results"), "--work_dir", str(out),
    ]  # fmt: skip
    from _progress import run_with_progress

    run_with_progress({"fine_tune": (cmd, "field fine-tune")}, out, epochs, threads=args.threads)
    return out / "water_field.model"


def predict(calc, frames, response: bool):
    """U, F and (with ``response``) μ, Z, α of every structure, each in its own field."""
    out = {"energy": [], "forces": [], "dipole": [], "bec": [], "alpha": []}
    properties = ["energy", "forces"] + (["born_effective_charges", "polarizability"] if response else [])
    for atoms in frames:
        atoms = atoms.copy()
        atoms.calc = calc
        calc.calculate(atoms, properties)  # one pass: U, F, μ, Z and α together
        out["energy"].append(calc.results["energy"])
        out["forces"].append(calc.results["forces"])
        if response:
            out["dipole"].append(calc.results["dipole"])
            out["bec"].append(calc.results["born_effective_charges"])
            out["alpha"].append(calc.results["polarizability"])
    return out


def references(frames):
    return {
        "energy": np.array([a.info["REF_energy"] for a in frames]),
        "forces": np.concatenate([a.arrays["REF_forces"] for a in frames]),
        "dipole": np.array([a.info["REF_dipole"] for a in frames]),
        "bec": np.concatenate([a.arrays["REF_born_charges"].reshape(-1, 3, 3) for a in frames]),
        "alpha": np.array([a.info["REF_polarizability"].reshape(3, 3) for a in frames]),
    }


def rmse(a, b) -> float:
    return float(np.sqrt(np.mean((np.asarray(a) - np.asarray(b)) ** 2)))


def spread(ref: np.ndarray, groups=None) -> float:
    """RMS deviation of the components from their mean over the data set (or within each group)."""
    ref = np.asarray(ref)
    if groups is None:
        return float(np.sqrt(np.mean((ref - ref.mean(axis=0)) ** 2)))
    groups = np.asarray(groups)
    dev = np.concatenate([ref[groups == g] - ref[groups == g].mean(axis=0) for g in np.unique(groups)])
    return float(np.sqrt(np.mean(dev**2)))


def field_md(calc, steps: int, field=(0.0, 0.0, 0.3)):
    """NVE of water in a uniform field: returns total energies, dipoles and Σ_i Z_i per step."""
    from ase import units
    from ase.build import molecule
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
    from ase.md.verlet import VelocityVerlet

    atoms = molecule("H2O")
    atoms.info["external_field"] = np.asarray(field, dtype=float)
    atoms.calc = calc
    MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(0))
    md = VelocityVerlet(atoms, timestep=0.25 * units.fs)
    energies, dipoles, sum_z = [], [], []

    def record():
        energies.append(atoms.get_potential_energy() + atoms.get_kinetic_energy())
        dipoles.append(atoms.get_dipole_moment())
        sum_z.append(np.abs(calc.get_property("born_effective_charges", atoms).sum(0)).max())

    md.attach(record, interval=1)
    md.run(steps)
    return np.array(energies), np.array(dipoles), np.array(sum_z)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="small budget (for tests)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "field_response_out")
    parser.add_argument("--base", type=Path, default=DATA / "base_mace.model")
    parser.add_argument("--train", type=Path, default=DATA / "field_train.xyz")
    parser.add_argument("--valid", type=Path, default=DATA / "field_valid.xyz")
    parser.add_argument("--test", type=Path, default=DATA / "field_test.xyz")
    parser.add_argument("--lr", type=float, default=0.003)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    # the runs happen in their own folders: relative paths are taken from where the user is
    for key in ("out", "base", "train", "valid", "test"):
        setattr(args, key, getattr(args, key).resolve())
    epochs = args.epochs or (2 if args.fast else 40)
    args.out.mkdir(parents=True, exist_ok=True)

    import ase.io
    import torch

    torch.set_num_threads(args.threads)
    from mace.calculators import MACECalculator

    import mace_lr

    t0 = time.perf_counter()
    model = fine_tune(args.out, epochs, args)
    print(f"fine-tuning took {time.perf_counter() - t0:.0f} s")

    test = ase.io.read(args.test, index=":")
    if args.fast:
        test = test[::6]
    ref = references(test)
    base = predict(
        MACECalculator(model_paths=str(args.base), device="cpu", default_dtype="float64"), test, False
    )
    calc = mace_lr.MACELRCalculator(model_paths=str(model), device="cpu", default_dtype="float64")
    tuned = predict(calc, test, True)

    n_atoms = np.array([len(a) for a in test])
    molecules = [a.info["molecule"] for a in test]
    rows = [
        ("U (meV/atom)", 1e3, ref["energy"] / n_atoms, base["energy"] / n_atoms, tuned["energy"] / n_atoms),
        ("F (meV/Å)", 1e3, ref["forces"], np.concatenate(base["forces"]), np.concatenate(tuned["forces"])),
        ("μ (e·Å)", 1.0, ref["dipole"], np.zeros_like(ref["dipole"]), np.array(tuned["dipole"])),
        ("Z (e)", 1.0, ref["bec"], np.zeros_like(ref["bec"]), np.concatenate(tuned["bec"])),
        ("α (e·Å²/V)", 1.0, ref["alpha"], np.zeros_like(ref["alpha"]), np.array(tuned["alpha"])),
    ]
    lines = [
        f"held-out: {len(test)} molecules in fields up to "
        f"{max(np.linalg.norm(a.info['external_field']) for a in test):.2f} V/Å; {epochs} epochs",
        f"{'quantity':<14} {'spread of data':>15} {'base RMSE':>10} {'fine-tuned RMSE':>16} {'RMSE / spread':>14}",
    ]
    for name, scale, r, b, t in rows:
        # energies: spread within each molecule (conformation and field), not across molecules
        s = spread(r, molecules if name.startswith("U") else None)
        lines.append(
            f"{name:<14} {scale * s:15.4g} {scale * rmse(b, r):10.4g} {scale * rmse(t, r):16.4g} "
            f"{rmse(t, r) / s:14.3f}"
        )
    steps = 20 if args.fast else 400
    energies, dipoles, sum_z = field_md(calc, steps)
    lines.append(
        f"NVE water in 0.3 V/Å ({steps} steps of 0.25 fs): total-energy drift "
        f"{1e3 * (energies.max() - energies.min()):.3f} meV, dipole z from {dipoles[0, 2]:+.3f} to "
        f"{dipoles[-1, 2]:+.3f} e·Å, max |Σ_i Z_i| {sum_z.max():.1e} e"
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
    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    for ax, (name, _, r, _, t) in zip(axes, rows[2:]):
        ax.plot(r.ravel(), np.asarray(t).ravel(), ".", ms=3, alpha=0.6)
        lim = [min(r.min(), np.min(t)), max(r.max(), np.max(t))]
        ax.plot(lim, lim, "k-", lw=0.5)
        ax.set_xlabel(f"GFN2-xTB {name}")
        ax.set_ylabel(f"fine-tuned {name}")
        ax.set_title(f"{name}: RMSE {rmse(t, r):.3g} (spread {spread(r):.3g})", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out / "parity.png", dpi=120)
    print(f"plot: {args.out / 'parity.png'}")


if __name__ == "__main__":
    main()
