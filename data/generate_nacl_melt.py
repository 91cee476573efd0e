"""Molten NaCl boxes labelled with periodic GFN1-xTB (tblite) for tutorial 5 (diagnostics).

Two independent ab initio Langevin trajectories of a 64-atom NaCl box (32 Na + 32 Cl, cubic,
L = 12.6 Å, about the density of molten NaCl near 1100 K, 1.55 g/cm³) run with GFN1-xTB at
1500 K. Every second step after a short equilibration is written with its energy, forces,
stress and tblite's atomic charges:

* run A (seed 1, 200 steps of 2 fs) → ``nacl_melt_train.xyz`` (the first 80 % of the kept
  frames) and ``nacl_melt_valid.xyz`` (the rest);
* run B (seed 2, 80 steps) → ``nacl_melt_test.xyz``.

The MD starts from the rock-salt lattice expanded to the box and rattled (σ = 0.25 Å), so
the first 30 steps (60 fs) are discarded. The frames are correlated (4 fs apart): they are
training data for a short fine-tune, not a statistical sample. ``nacl_melt_generation_log.txt``
records settings, timings and energy/charge statistics.

    OMP_NUM_THREADS=1 python data/generate_nacl_melt.py     # ~10 min on one core
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from ase import units  # noqa: E402
from ase.build import bulk  # noqa: E402
from ase.io import write  # noqa: E402
from ase.md.langevin import Langevin  # noqa: E402
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution  # noqa: E402
from tblite.ase import TBLite  # noqa: E402

HERE = Path(__file__).resolve().parent
BOX = 12.6  # Å
TEMPERATURE = 1500.0  # K
DT = 2.0  # fs
EQUIL = 30  # steps discarded
STRIDE = 2
METHOD = "GFN1-xTB"


def start_box(seed: int):
    atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True).repeat((2, 2, 2))
    atoms.set_cell(np.eye(3) * BOX, scale_atoms=True)
    atoms.rattle(0.25, seed=seed)
    atoms.pbc = True
    return atoms


def run(seed: int, steps: int, log: list):
    atoms = start_box(seed)
    atoms.calc = TBLite(method=METHOD, verbosity=0)
    rng = np.random.default_rng(seed)
    MaxwellBoltzmannDistribution(atoms, temperature_K=TEMPERATURE, rng=rng)
    dyn = Langevin(atoms, DT * units.fs, temperature_K=TEMPERATURE, friction=0.02, rng=rng)
    frames = []
    t0 = time.perf_counter()

    def record():
        step = dyn.nsteps
        if step < EQUIL or step % STRIDE:
            return
        frame = atoms.copy()
        frame.calc = None
        frame.info["REF_energy"] = float(atoms.get_potential_energy())
        frame.info["REF_stress"] = atoms.get_stress(voigt=False).reshape(-1)  # eV/Å³
        frame.info["charge"] = 0.0
        frame.info["config_type"] = "nacl_melt"
        frame.info["md_step"] = int(step)
        frame.info["temperature_K"] = float(atoms.get_temperature())
        frame.arrays["REF_forces"] = atoms.get_forces().copy()
        frame.arrays["REF_charges"] = atoms.get_charges().copy()
        frame.set_velocities(atoms.get_velocities())
        frames.append(frame)

    dyn.attach(record, interval=1)
    dyn.run(steps)
    wall = time.perf_counter() - t0
    energies = np.array([f.info["REF_energy"] for f in frames])
    q = np.concatenate([f.arrays["REF_charges"] for f in frames])
    na = np.concatenate([f.numbers == 11 for f in frames])
    temps = np.array([f.info["temperature_K"] for f in frames])
    log.append(
        f"run seed {seed}: {steps} steps of {DT} fs at {TEMPERATURE} K, {len(frames)} frames kept, "
        f"{wall:.0f} s; E/atom {energies.mean() / 64:.4f} ± {energies.std() / 64:.4f} eV; "
        f"T kept {temps.mean():.0f} ± {temps.std():.0f} K; "
        f"q(Na) {q[na].mean():+.3f} ± {q[na].std():.3f} e, q(Cl) {q[~na].mean():+.3f} ± {q[~na].std():.3f} e"
    )
    return frames


def main() -> None:
    log = [
        f"method {METHOD} (tblite, periodic, defaults otherwise); 32 Na + 32 Cl in a {BOX} Å cube",
        f"Langevin friction 0.02 / fs, T {TEMPERATURE} K, dt {DT} fs, first {EQUIL} steps dropped, "
        f"every {STRIDE}",
    ]
    a = run(1, 200, log)
    b = run(2, 80, log)
    n_train = int(0.8 * len(a))
    write(HERE / "nacl_melt_train.xyz", a[:n_train])
    write(HERE / "nacl_melt_valid.xyz", a[n_train:])
    write(HERE / "nacl_melt_test.xyz", b)
    log.append(f"train {n_train}, valid {len(a) - n_train} (run seed 1), test {len(b)} (run seed 2)")
    (HERE / "nacl_melt_generation_log.txt").write_text("\n".join(log) + "\n")


if __name__ == "__main__":
    main()
