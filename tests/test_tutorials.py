"""The tutorials run end to end (``--fast`` mode) and print their summary."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"

pytest.importorskip("tblite.ase")


def test_quickstart_fast(tmp_path):
    out_dir = tmp_path / "quickstart"
    # one thread: the systems are tiny, and it keeps the run fast when other jobs compete
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, str(TUTORIALS / "01_quickstart.py"), "--fast", "--out", str(out_dir)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,  # anything written outside --out would land here, not in the repo
        env=env,
    )
    assert proc.returncode == 0, (
        f"tutorial failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    match = re.search(r"^NVE energy drift \(eV/atom/ps\)\s+(\S+)\s*$", proc.stdout, re.MULTILINE)
    assert match, f"no energy-drift line in the summary:\n{proc.stdout[-2000:]}"
    drift = float(match.group(1))
    assert math.isfinite(drift) and abs(drift) < 1e-2, f"NVE drift {drift} eV/atom/ps"
    assert (out_dir / "nacl_les.model").is_file()
    assert (out_dir / "nve.csv").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["quickstart"], "files written outside --out"


def test_main_job_fast(tmp_path):
    """The README's main job: two CLI fine-tunes, ASE evaluation, table and plot."""
    out_dir = tmp_path / "main_job"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, str(TUTORIALS / "02_main_job.py"), "--fast", "--out", str(out_dir)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
        env=env,
    )
    assert proc.returncode == 0, f"main job failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    table = proc.stdout
    for row in (
        "base (no fine-tuning)",
        "short-range fine-tuned",
        "LES fine-tuned",
        "ratio short-range / LES",
    ):
        assert row in table
    assert (out_dir / "binding_curves.png").stat().st_size > 10_000
    assert (out_dir / "dimers_les.model").is_file() and (out_dir / "summary.txt").is_file()
    import mace_lr

    model = mace_lr.load(out_dir / "dimers_les.model")  # safe format, readable without pickle
    assert float(model.blocks["les"].coupling.detach()) != 0.0


def test_field_response_fast(tmp_path):
    """Tutorial 3: field fine-tune through the CLI, held-out μ, Z, α from ASE, finite-field MD."""
    out_dir = tmp_path / "field"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        # relative --out and --base, taken from the caller's folder (the runs happen in their own)
        [
            sys.executable,
            str(TUTORIALS / "03_field_response.py"),
            "--fast",
            "--out",
            "field",
            "--base",
            os.path.relpath(TUTORIALS.parent / "data" / "base_mace.model", tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
        env=env,
    )
    assert proc.returncode == 0, f"tutorial failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    rows = {}
    for line in (out_dir / "summary.txt").read_text().splitlines():
        for name in ("μ (e·Å)", "Z (e)", "α (e·Å²/V)"):
            if line.startswith(name):
                spread, base, tuned, _ = (float(x) for x in line[len(name) :].split())
                rows[name] = (spread, base, tuned)
        if line.startswith("NVE"):
            md = line
    assert set(rows) == {"μ (e·Å)", "Z (e)", "α (e·Å²/V)"}
    for name, (spread, base, tuned) in rows.items():
        # even two epochs learn the response: well below the base (which has none) and the spread
        assert tuned < 0.5 * base and tuned < 0.5 * spread, (name, rows[name])
    drift = float(md.split("total-energy drift ")[1].split(" meV")[0])
    sum_z = float(md.split("max |Σ_i Z_i| ")[1].split(" e")[0])
    assert drift < 1.0 and sum_z < 1e-6, md
    assert (out_dir / "parity.png").stat().st_size > 10_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["field"], "files written outside --out"


def test_wannier_centroids_fast(tmp_path):
    """Tutorial 4: wannier block fine-tuned on B3LYP water clusters, centroids explicit or from dipoles."""
    out_dir = tmp_path / "wannier"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, str(TUTORIALS / "04_wannier_centroids.py"), "--fast", "--out", str(out_dir)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
        env=env,
    )
    assert proc.returncode == 0, f"tutorial failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    rows = {}
    for line in (out_dir / "summary.txt").read_text().splitlines():
        for name in ("fresh block", "fine-tuned, dipoles only", "fine-tuned, centroids + dipoles"):
            if line.startswith(name):
                rows[name] = [float(x) for x in line.split()[-5:]]
    assert set(rows) == {"fresh block", "fine-tuned, dipoles only", "fine-tuned, centroids + dipoles"}
    w_fresh, _, mu_fresh, _, f_fresh = rows["fresh block"]
    w_exp, _, mu_exp, _, f_exp = rows["fine-tuned, centroids + dipoles"]
    w_imp, _, mu_imp, _, _ = rows["fine-tuned, dipoles only"]
    # a fresh block leaves each centroid on its oxygen (|W-R| ~ 0.1 Å off) and the formal-charge dipole
    assert w_fresh > 0.03 and mu_fresh > 0.3
    assert w_exp < 0.25 * w_fresh and mu_exp < 0.25 * mu_fresh, rows
    # dipoles alone already place the centroids (one centroid per water molecule)
    assert w_imp < 0.5 * w_fresh and mu_imp < 0.25 * mu_fresh, rows
    assert f_exp < f_fresh, rows
    assert (out_dir / "parity.png").stat().st_size > 10_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wannier"], "files written outside --out"


def test_ionic_diagnostics_fast(tmp_path):
    """Tutorial 5: LES and short-range models of molten NaCl, S_QQ(k) and conductivity of their MD."""
    out_dir = tmp_path / "diagnostics"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, str(TUTORIALS / "05_ionic_diagnostics.py"), "--fast", "--out", str(out_dir)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
        env=env,
    )
    assert proc.returncode == 0, f"tutorial failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    summary = (out_dir / "summary.txt").read_text()
    sigma = {}
    for line in summary.splitlines():
        for label in ("LES", "short-range"):
            if line.strip().startswith(label) and line.count("±") == 2:
                gk, _, gk_err, eh, _, eh_err, ne = line.split()[1:]
                sigma[label] = [float(x) for x in (gk, gk_err, eh, eh_err, ne)]
    assert set(sigma) == {"LES", "short-range"}, summary
    for label, values in sigma.items():
        assert all(math.isfinite(v) for v in values) and values[0] > 0 and values[2] > 0, (label, values)
    assert "Stillinger–Lovett" in summary and "small-k fit" in summary
    assert (out_dir / "sqq.png").stat().st_size > 10_000
    assert (out_dir / "conductivity.png").stat().st_size > 10_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["diagnostics"], "files written outside --out"


def test_nonlocal_blocks_fast(tmp_path):
    """Tutorial 6: CLI fine-tunes with and without the attention block on the polyyne quartets."""
    out_dir = tmp_path / "nonlocal"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, str(TUTORIALS / "06_nonlocal_blocks.py"), "--fast", "--blocks", "sr,attention",
         "--out", str(out_dir)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
        env=env,
    )  # fmt: skip
    assert proc.returncode == 0, f"tutorial failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    rows = {}
    for line in proc.stdout.splitlines():
        m = re.match(r"^(.+?fine-tun\w+\)?)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s*$", line)
        if m:
            rows[m.group(1).strip()] = [float(x) for x in m.groups()[1:]]
    assert {"base (no fine-tuning)", "short-range fine-tuned", "attention fine-tuned"} <= set(rows), (
        proc.stdout
    )
    # the data are built so that any short-range model is exactly additive across a quartet:
    # its predicted non-additivity ddE must vanish (to rounding), whatever it learned
    for name in ("base (no fine-tuning)", "short-range fine-tuned"):
        assert abs(rows[name][3]) < 0.05, f"{name} predicts ddE = {rows[name][3]} meV"
    assert all(math.isfinite(x) for r in rows.values() for x in r)
    assert (out_dir / "nonlocal_attention.model").is_file() and (out_dir / "summary.txt").is_file()
    assert "floor of any additive" in proc.stdout


def test_lorem_cumulenes_fast(tmp_path):
    """Tutorial 7: three CLI fine-tunes (short-range, LES, lorem), per-length table and plot."""
    out_dir = tmp_path / "cumulenes"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, str(TUTORIALS / "07_lorem_cumulenes.py"), "--fast", "--out", str(out_dir)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
        env=env,
    )
    assert proc.returncode == 0, f"tutorial failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    rows = {}
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) == 5 and parts[0] in ("5", "12"):
            rows.setdefault(int(parts[0]), [float(x) for x in parts[1:]])
    assert sorted(rows) == [5, 12], f"no per-length rows in:\n{proc.stdout[-2000:]}"
    for n, (barrier, *rmse) in rows.items():
        assert abs(barrier) > 0.3 and all(math.isfinite(x) and x > 0 for x in rmse), (n, barrier, rmse)
    assert (out_dir / "torsion_profiles.png").is_file() and (out_dir / "summary.txt").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cumulenes"], "files written outside --out"
