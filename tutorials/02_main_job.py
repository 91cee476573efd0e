"""The main job: fine-tune the shipped small MACE with an LES block, evaluate from ASE.

What it does (all on the data shipped in ``data/``, see ``data/README.md``):

1. fine-tunes ``data/base_mace.model`` (a small short-range MACE, r_max 4.5 Å) on
   ``data/dimers_train.xyz`` (GFN2-xTB molecular dimers at 3.5–8 Å: ion pairs,
   ion–polar and polar pairs) twice with the same budget, through the same command line
   a user would type:

   * ``mace_lr_run_train ... --lr_blocks les``   (long-range: learned charges + Coulomb)
   * ``mace_lr_run_train ...``                   (short-range baseline, plain fine-tuning)

2. evaluates the base and both fine-tuned models from ASE on ``data/dimers_test.xyz``:
   the *held-out separations* 9–15 Å, beyond the training range and beyond the reach of
   message passing;
3. prints a before/after table (total-energy, binding-energy and force errors) and
   writes a binding-curve plot (``binding_curves.png``) and the table (``summary.txt``).

    python tutorials/02_main_job.py            # about 8 minutes on 2 CPU cores
    python tutorials/02_main_job.py --fast     # about a minute (used by the tests)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"


def _command(name: str, out: Path, epochs: int, les: bool, args) -> list:
    cmd = [
        sys.executable, "-m", "mace_lr.cli.run_train",
        "--name", name,
        "--foundation_model", str(args.base),
        "--train_file", str(args.train), "--valid_file", str(args.valid),
        "--energy_key", "REF_energy", "--forces_key", "REF_forces",
        "--total_charge_key", "charge",
        "--E0s", "foundation",
        "--energy_weight", "100.0", "--forces_weight", "10.0",
        "--max_num_epochs", str(epochs), "--batch_size", "4", "--valid_batch_size", "20",
        "--lr", str(args.lr), "--scheduler_patience", "5", "--ema", "--ema_decay", "0.99",
        "--device", "cpu", "--default_dtype", "float64", "--seed", str(args.seed), "--pin_memory", "False",
        "--model_dir", str(out), "--checkpoints_dir", str(out / "checkpoints"),
        "--log_dir", str(out / "logs"), "--results_dir", str(out / "results"), "--work_dir", str(out),
    ]  # fmt: skip
    if les:
        cmd += ["--lr_blocks", "les", "--lr_config", '{"smearing": 1.0}',
                "--dipole_key", "REF_dipole", "--dipole_weight", "5.0"]  # fmt: skip
    return cmd


def train_both(out: Path, epochs: int, args) -> tuple:
    """Run both fine-tunes (mace_lr_run_train) side by side, one core each, with progress bars."""
    from _progress import run_with_progress

    run_with_progress(
        {
            "dimers_les": (_command("dimers_les", out, epochs, True, args), "LES fine-tune        "),
            "dimers_sr": (_command("dimers_sr", out, epochs, False, args), "short-range fine-tune"),
        },
        out,
        epochs,
    )
    return out / "dimers_les.model", out / "dimers_sr.model"


def predict(calc, frames):
    """Energies, forces and fragment-wise binding energies predicted by ``calc``."""
    energies, forces, binding = [], [], []
    mono_cache = {}
    for atoms in frames:
        atoms = atoms.copy()
        atoms.calc = calc
        energies.append(atoms.get_potential_energy())
        forces.append(atoms.get_forces())
        parts = []
        for frag in (0, 1):
            sub = atoms[atoms.arrays["fragment"] == frag]
            key = (
                frag,
                atoms.info.get("mol_A") if frag == 0 else atoms.info.get("mol_B"),
                sub.positions.tobytes(),
            )
            if key not in mono_cache:
                sub.info["charge"] = int(
                    round(float(atoms.info["REF_charge_A" if frag == 0 else "REF_charge_B"]))
                )
                sub.calc = calc
                mono_cache[key] = sub.get_potential_energy()
            parts.append(mono_cache[key])
        binding.append(energies[-1] - sum(parts))
    return np.array(energies), forces, np.array(binding)


def errors(frames, energies, forces, binding):
    ref_e = np.array([a.info["REF_energy"] for a in frames])
    ref_b = np.array([a.info["REF_binding_energy"] for a in frames])
    ref_f = np.concatenate([a.arrays["REF_forces"] for a in frames])
    f = np.concatenate(forces)
    return {
        "E": 1000 * np.sqrt(np.mean((energies - ref_e) ** 2)),
        "Ebind": 1000 * np.sqrt(np.mean((binding - ref_b) ** 2)),
        "F": 1000 * np.sqrt(np.mean((f - ref_f) ** 2)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="small budget (for tests)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "main_job_out")
    parser.add_argument("--base", type=Path, default=DATA / "base_mace.model")
    parser.add_argument("--train", type=Path, default=DATA / "dimers_train.xyz")
    parser.add_argument("--valid", type=Path, default=DATA / "dimers_valid.xyz")
    parser.add_argument("--test", type=Path, default=DATA / "dimers_test.xyz")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="threads for the evaluation")
    args = parser.parse_args()
    # the fine-tunes run inside --out: make the data and model paths independent of the cwd
    args.base, args.train, args.valid, args.test = (
        p.resolve() for p in (args.base, args.train, args.valid, args.test)
    )
    epochs = args.epochs or (2 if args.fast else 50)
    args.out.mkdir(parents=True, exist_ok=True)

    import ase.io
    import torch

    torch.set_num_threads(args.threads)
    from mace.calculators import MACECalculator

    import mace_lr

    t0 = time.perf_counter()
    les_model, sr_model = train_both(args.out, epochs, args)
    print(f"fine-tuning took {time.perf_counter() - t0:.0f} s")

    test = ase.io.read(args.test, index=":")
    if args.fast:
        test = test[::8]
    calcs = {
        "base (no fine-tuning)": MACECalculator(
            model_paths=str(args.base), device="cpu", default_dtype="float64"
        ),
        "short-range fine-tuned": MACECalculator(
            model_paths=str(sr_model), device="cpu", default_dtype="float64"
        ),
        "LES fine-tuned": mace_lr.MACELRCalculator(
            model_paths=str(les_model), device="cpu", default_dtype="float64"
        ),
    }
    results = {}
    for name, calc in calcs.items():
        e, f, b = predict(calc, test)
        results[name] = {"pred": (e, f, b), "err": errors(test, e, f, b)}

    lines = [
        f"held-out separations {min(a.info['separation'] for a in test):.1f}–{max(a.info['separation'] for a in test):.1f} Å, "
        f"{len(test)} dimers, {epochs} epochs each",
        f"{'model':<26} {'RMSE E (meV)':>13} {'RMSE E_bind (meV)':>18} {'RMSE F (meV/Å)':>15}",
    ]
    for name, r in results.items():
        err = r["err"]
        lines.append(f"{name:<26} {err['E']:13.1f} {err['Ebind']:18.1f} {err['F']:15.1f}")
    sr, lr = results["short-range fine-tuned"]["err"], results["LES fine-tuned"]["err"]
    lines.append(
        f"ratio short-range / LES: energy {sr['E'] / lr['E']:.1f}x, binding energy {sr['Ebind'] / lr['Ebind']:.1f}x, forces {sr['F'] / lr['F']:.1f}x"
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
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, family in zip(axes, ("ion_pair", "ion_polar")):
        idx = [i for i, a in enumerate(test) if a.info["config_type"] == family]
        if not idx:
            continue
        r = np.array([test[i].info["separation"] for i in idx])
        order = np.argsort(r)
        ax.plot(
            r[order],
            [test[i].info["REF_binding_energy"] for i in np.array(idx)[order]],
            "ko",
            label="GFN2-xTB",
        )
        # markers only: neighbouring separations are different molecules and orientations
        for name, style in zip(results, ("s", "^", "v")):
            b = results[name]["pred"][2]
            ax.plot(r[order], b[np.array(idx)[order]], style, ms=5, label=name, alpha=0.7)
        ax.axhline(0.0, color="grey", lw=0.5)
        ax.set_xlabel("centre-of-mass separation (Å)")
        ax.set_ylabel("binding energy (eV)")
        ax.set_title(family.replace("_", "–"))
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "binding_curves.png", dpi=120)
    print(f"plot: {args.out / 'binding_curves.png'}")


if __name__ == "__main__":
    main()
