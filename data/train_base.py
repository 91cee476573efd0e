"""Train the small short-range base MACE shipped as data/base_mace.model.

    python data/train_base.py                   # broad base (default): data/base_mace.model
    python data/train_base.py --recipe dimers   # the earlier dimer-only base: data/base_mace_dimers.model

Recipe "broad" (the shipped base_mace.model): the GFN2-xTB small molecules and ions of
data/generate_base_molecules.py (data/base_molecules_train.xyz: rattled monomers and random close
pairs of 120 species made of H/C/N/O/F/Cl/Na) plus every configuration of data/dimers_train.xyz
with centre-of-mass separation < 5 Å that contains no water (water is held out of the base, see
data/README.md). Validation: data/base_molecules_valid.xyz plus the same filter on
data/dimers_valid.xyz. Test (never trained on): the held-out families
(data/base_molecules_heldout.xyz) and data/dimers_test.xyz (9–15 Å).

Recipe "dimers" (the earlier base, kept as data/base_mace_dimers.model because some figures in
data/README.md were measured with it): every configuration of data/dimers_train.xyz with
separation < 5 Å (rattled monomers have separation 0), validation the same filter on
data/dimers_valid.xyz, test data/dimers_test.xyz; 80 epochs of batch 4.

mace's own CLI (mace.cli.run_train) does the training; all its working directories live in a
temporary directory that is deleted afterwards. Outputs (NAME = base_mace or base_mace_dimers):
    data/NAME.model          mace's pickled model (torch.load(..., weights_only=False))
    data/NAME_training.txt   command, versions, wall time, per-epoch validation, final tables
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

from ase.io import read, write

HERE = Path(__file__).resolve().parent
SEPARATION_MAX = 5.0  # Å, centre-of-mass separation cut for the short-range training data

MACE_ARGS = [
    *("--model", "MACE"),
    *("--num_channels", "16"),
    *("--max_L", "1"),
    *("--max_ell", "2"),
    *("--radial_MLP", "[32,32]"),
    *("--r_max", "4.5"),
    *("--num_interactions", "2"),
    *("--correlation", "2"),
    *("--E0s", "average"),
    *("--energy_key", "REF_energy"),
    *("--forces_key", "REF_forces"),
    *("--energy_weight", "100"),
    *("--forces_weight", "10"),
    "--ema",
    *("--valid_batch_size", "16"),
    *("--default_dtype", "float64"),
    *("--device", "cpu"),
    *("--seed", "1"),
]
# No --swa / --restart_latest (both off by default). Energy weight 100 / forces weight 10 (mace's
# default is 1/100): the per-molecule energy offsets left after the least-squares E0s are up to
# ~1.4 eV/atom and are barely learned in a few hundred steps at the default weights.
# max_ell 2 and a [32,32] radial MLP keep an epoch at ~3 s on one CPU thread (dimer recipe).
RECIPES = {
    "broad": dict(name="base_mace", batch_size=8, epochs=100),
    "dimers": dict(name="base_mace_dimers", batch_size=4, epochs=80),
}


def no_water(atoms) -> bool:
    return "water" not in (atoms.info.get("mol_A"), atoms.info.get("mol_B"))


def short_range(src: Path, broad: bool) -> list:
    frames = [a for a in read(src, ":") if a.info["separation"] < SEPARATION_MAX]
    return [a for a in frames if no_water(a)] if broad else frames


def datasets(recipe: str, tmp: Path) -> list[str]:
    """Write train/valid/test files into tmp; return the record's description lines."""
    broad = recipe == "broad"
    train = short_range(HERE / "dimers_train.xyz", broad)
    valid = short_range(HERE / "dimers_valid.xyz", broad)
    test = read(HERE / "dimers_test.xyz", ":")
    cut = f"separation < {SEPARATION_MAX} Å" + (", no water" if broad else "")
    lines = [
        f"# train: {len(train)} configurations of data/dimers_train.xyz with {cut}",
        f"# valid: {len(valid)} configurations of data/dimers_valid.xyz with {cut}",
        f"# test:  all {len(test)} configurations of data/dimers_test.xyz (9–15 Å, held out)",
    ]
    if broad:
        extra = {k: read(HERE / f"base_molecules_{k}.xyz", ":") for k in ("train", "valid", "heldout")}
        train, valid, test = extra["train"] + train, extra["valid"] + valid, extra["heldout"] + test
        lines += [
            f"#      + {len(extra['train'])} configurations of data/base_molecules_train.xyz (train)",
            f"#      + {len(extra['valid'])} configurations of data/base_molecules_valid.xyz (valid)",
            f"#      + {len(extra['heldout'])} configurations of data/base_molecules_heldout.xyz (test)",
        ]
    for name, frames in (("train", train), ("valid", valid), ("test", test)):
        write(tmp / f"{name}.xyz", frames, format="extxyz")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="broad")
    parser.add_argument("--epochs", type=int, default=None, help="override (timing runs only)")
    args = parser.parse_args()
    recipe = RECIPES[args.recipe]
    name, epochs = recipe["name"], args.epochs or recipe["epochs"]
    with tempfile.TemporaryDirectory(prefix="mace_lr_base_") as tmp:
        tmp = Path(tmp)
        described = datasets(args.recipe, tmp)
        test_file = tmp / "test.xyz" if args.recipe == "broad" else HERE / "dimers_test.xyz"
        cmd = [sys.executable, "-m", "mace.cli.run_train", "--name", name, *MACE_ARGS,
               "--batch_size", str(recipe["batch_size"]), "--max_num_epochs", str(epochs),
               "--train_file", str(tmp / "train.xyz"), "--valid_file", str(tmp / "valid.xyz"),
               "--test_file", str(test_file), "--work_dir", str(tmp / "work")]  # fmt: skip
        # one thread: on a small shared CPU, torch's default multi-threading is many times slower
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        t0 = time.time()
        subprocess.run(
            cmd, check=True, env=env, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wall = time.time() - t0
        work = tmp / "work"
        shutil.copyfile(work / f"{name}.model", HERE / f"{name}.model")
        log_lines = next((work / "logs").glob(f"{name}_run-*.log")).read_text().splitlines()

    def strip(line: str) -> str:  # drop mace's "2026-01-01 00:00:00.000 INFO: " prefix
        return line.split(" INFO: ", 1)[1] if " INFO: " in line else line

    epochs = [strip(x) for x in log_lines if " INFO: Initial:" in x or " INFO: Epoch " in x]
    start = next(i for i, x in enumerate(log_lines) if "Error-table on TRAIN and VALID" in x)
    tables = [strip(x) for x in log_lines[start:] if " INFO: Done" not in x and "Evaluating" not in x
              and "Skipping evaluation" not in x]  # fmt: skip
    shown = [a.replace(str(tmp), "$TMP").replace(str(HERE.parent) + "/", "") for a in cmd[1:]]
    report = [
        "# Base MACE training record (written by data/train_base.py)",
        f"# mace-torch {version('mace-torch')}, torch {version('torch')}, ase {version('ase')}, "
        f"python {sys.version.split()[0]}, OMP_NUM_THREADS=1",
        f"# recipe: {args.recipe}",
        *described,
        "# command: python " + " ".join(shown),
        f"# wall time: {wall:.0f} s",
        "",
        "## validation metrics per epoch",
        *epochs,
        "",
        "## final error tables (config_type = set_head; RMSE E per atom on total energies)",
        *tables,
    ]
    (HERE / f"{name}_training.txt").write_text("\n".join(report) + "\n")
    print("\n".join(report))


if __name__ == "__main__":
    main()
