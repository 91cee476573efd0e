"""Run ``mace_lr_run_train`` commands side by side with one progress bar each (tutorial helper)."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Tuple


def run_with_progress(
    runs: Dict[str, Tuple[List[str], str]], out: Path, epochs: int, threads: int = 1
) -> Dict[str, Path]:
    """Start every command at once and follow the epochs mace logs.

    Args:
        runs: run name → (command, progress-bar label).
        out: working directory; each run's output goes to ``<out>/<name>.stdout``.
        epochs: epochs per run (the length of the bars).
        threads: OpenMP/torch threads per run.

    Returns:
        run name → the log file. Exits with the end of the log if a run fails.
    """
    from tqdm import tqdm

    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    procs, bars, logs, done = {}, {}, {}, {}
    for position, (name, (cmd, label)) in enumerate(runs.items()):
        logs[name] = out / f"{name}.stdout"
        bars[name] = tqdm(total=epochs, desc=label, unit="epoch", position=position)
        with open(logs[name], "w") as fh:
            procs[name] = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=out)
        done[name] = 0
    while any(p.poll() is None for p in procs.values()):
        time.sleep(1.0)
        for name in runs:
            seen = len(set(re.findall(r"INFO: Epoch (\d+):", logs[name].read_text(errors="replace"))))
            if seen > done[name]:
                bars[name].update(seen - done[name])
                done[name] = seen
    for bar in bars.values():
        bar.close()
    for name, proc in procs.items():
        if proc.returncode != 0:
            tail = logs[name].read_text(errors="replace")[-3000:]
            raise SystemExit(f"{name} failed (exit {proc.returncode}); end of {logs[name]}:\n{tail}")
    return logs
