"""Train the small short-range base MACE shipped as data/base_mace.model.

    python data/train_base.py                 # needs data/dimers_{train,valid,test}.xyz

Training data: the short-range part of the reference data made by data/generate_dimers.py,
i.e. every configuration of data/dimers_train.xyz with centre-of-mass separation < 5 Å
(rattled monomers have separation 0). Validation: the same filter on data/dimers_valid.xyz.
data/dimers_test.xyz (9–15 Å, never seen) is passed as --test_file so that mace's final error
table also shows how a short-range model does on held-out separations.

mace's own CLI (mace.cli.run_train) does the training; all its working directories live in a
temporary directory that is deleted afterwards. Outputs:
    data/base_mace.model          mace's pickled model (torch.load(..., weights_only=False))
    data/base_mace_training.txt   command, versions, wall time, per-epoch validation, final tables
"""

from __future__ import annotations

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
NAME = "base_mace"

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
    *("--batch_size", "4"),
    *("--valid_batch_size", "16"),
    *("--max_num_epochs", "80"),
    *("--default_dtype", "float64"),
    *("--device", "cpu"),
    *("--seed", "1"),
]
# No --swa / --restart_latest (both off by default). Energy weight 100 / forces weight 10 (mace's
# default is 1/100): the per-molecule energy offsets left after the least-squares E0s are up to
# ~1.4 eV/atom and are barely learned in a few hundred steps at the default weights.
# max_ell 2 and a [32,32] radial MLP keep an epoch at ~3 s on one CPU thread.


def short_range(src: Path, dst: Path) -> int:
    frames = [a for a in read(src, ":") if a.info["separation"] < SEPARATION_MAX]
    write(dst, frames, format="extxyz")
    return len(frames)


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="mace_lr_base_") as tmp:
        tmp = Path(tmp)
        n_train = short_range(HERE / "dimers_train.xyz", tmp / "train.xyz")
        n_valid = short_range(HERE / "dimers_valid.xyz", tmp / "valid.xyz")
        n_test = len(read(HERE / "dimers_test.xyz", ":"))
        cmd = [sys.executable, "-m", "mace.cli.run_train", "--name", NAME, *MACE_ARGS,
               "--train_file", str(tmp / "train.xyz"), "--valid_file", str(tmp / "valid.xyz"),
               "--test_file", str(HERE / "dimers_test.xyz"), "--work_dir", str(tmp / "work")]  # fmt: skip
        # one thread: on a small shared CPU, torch's default multi-threading is many times slower
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        t0 = time.time()
        subprocess.run(
            cmd, check=True, env=env, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wall = time.time() - t0
        work = tmp / "work"
        shutil.copyfile(work / f"{NAME}.model", HERE / "base_mace.model")
        log_lines = next((work / "logs").glob(f"{NAME}_run-*.log")).read_text().splitlines()

    def strip(line: str) -> str:  # drop mace's "2026-01-01 00:00:00.000 INFO: " prefix
        return line.split(" INFO: ", 1)[1] if " INFO: " in line else line

    epochs = [strip(x) for x in log_lines if " INFO: Initial:" in x or " INFO: Epoch " in x]
    start = next(i for i, x in enumerate(log_lines) if "Error-table on TRAIN and VALID" in x)
    tables = [strip(x) for x in log_lines[start:] if " INFO: Done" not in x and "Evaluating" not in x
              and "Skipping evaluation" not in x]  # fmt: skip
    shown = [a.replace(str(tmp), "$TMP") for a in cmd[1:]]
    report = [
        "# Base MACE training record (written by data/train_base.py)",
        f"# mace-torch {version('mace-torch')}, torch {version('torch')}, ase {version('ase')}, "
        f"python {sys.version.split()[0]}, OMP_NUM_THREADS=1",
        f"# train: {n_train} configurations of data/dimers_train.xyz with separation < {SEPARATION_MAX} Å",
        f"# valid: {n_valid} configurations of data/dimers_valid.xyz with separation < {SEPARATION_MAX} Å",
        f"# test:  all {n_test} configurations of data/dimers_test.xyz (9–15 Å, held out)",
        "# command: python " + " ".join(shown),
        f"# wall time: {wall:.0f} s",
        "",
        "## validation metrics per epoch",
        *epochs,
        "",
        "## final error tables (config_type = set_head; RMSE E per atom on total energies)",
        *tables,
    ]
    (HERE / "base_mace_training.txt").write_text("\n".join(report) + "\n")
    print("\n".join(report))


if __name__ == "__main__":
    main()
