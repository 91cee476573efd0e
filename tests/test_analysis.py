"""Diagnostics of mace_lr.analysis against exact cases (issue 15)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms, units
from ase.build import bulk, molecule
from ase.io import write

import mace_lr
from mace_lr.analysis import (
    COULOMB,
    SIEMENS_PER_M,
    charge_structure_factor,
    conductivity_from_arrays,
    dielectric_constant,
    ionic_conductivity,
    plot_conductivity,
    plot_dielectric,
    plot_size_consistency,
    plot_sqq,
    size_consistency,
)
from mace_lr.testing import perturb_blocks

KB = 8.617333262e-5
DATA = Path(__file__).resolve().parents[1] / "data"


# ---------------------------------------------------------------- S_QQ(k)


def test_sqq_rock_salt_vanishes_except_at_bragg_peaks():
    a = 5.64
    crystal = bulk("NaCl", "rocksalt", a=a, cubic=True).repeat((2, 2, 2))
    res = charge_structure_factor([crystal], charges={"Na": 1, "Cl": -1}, kmax=6.0, temperature=1000.0)
    miller = res["k_vectors"] @ crystal.cell.array.T / (2 * np.pi) / 2  # (h, k, l) of the 5.64 Å cell
    integer = np.all(np.abs(miller - np.round(miller)) < 1e-8, axis=1)
    odd = integer & np.all(np.round(miller).astype(int) % 2 == 1, axis=1)
    assert odd.sum() >= 4 + 12  # (111) and (311) families, one of each ±k
    # charge-ordered (all odd): |ρ|² = N², so S = N; everywhere else exactly zero
    np.testing.assert_allclose(res["S_k"][odd], len(crystal), rtol=1e-10)
    assert np.abs(res["S_k"][~odd]).max() < 1e-20
    # the binned (111) shell: every vector in it is a Bragg peak
    k111 = 2 * np.pi * np.sqrt(3) / a
    shell = np.argmin(np.abs(res["k"] - k111))
    assert abs(res["k"][shell] - k111) < 1e-9 and res["count"][shell] == 4
    np.testing.assert_allclose(res["S"][shell], len(crystal), rtol=1e-10)
    assert abs(res["fit_slope"]) < 1e-18  # the first shells are all zero


def test_sqq_uncorrelated_charge_gas_is_flat():
    rng = np.random.default_rng(0)
    n, box, n_frames = 40, 10.0, 150
    frames, charges = [], []
    for _ in range(n_frames):
        frames.append(Atoms("H" * n, positions=rng.uniform(0, box, (n, 3)), cell=[box] * 3, pbc=True))
        charges.append(rng.normal(0.0, 0.7, n))
    res = charge_structure_factor(frames, charges=np.array(charges), kmax=2.5, temperature=300.0)
    q2 = res["q2_mean"]
    assert abs(q2 - 0.49) < 0.02
    dev = np.abs(res["S"] - q2)
    assert np.all(dev < 5 * res["S_err"]), (res["S"], res["S_err"])
    # every k, averaged over all shells: ⟨q²⟩ to a few per cent
    np.testing.assert_allclose(np.average(res["S"], weights=res["count"]), q2, rtol=0.03)
    assert res["fit_slope"] > 0.1  # finite at k → 0: nothing like k²


def test_sqq_charges_from_frames_and_stillinger_lovett_slope(tmp_path):
    crystal = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
    crystal.rattle(0.1, seed=1)
    crystal.arrays["charges"] = np.where(crystal.numbers == 11, 0.8, -0.8)
    path = tmp_path / "traj.extxyz"
    write(path, [crystal, crystal])
    from_file = charge_structure_factor(str(path), kmax=4.0, temperature=1000.0)
    given = charge_structure_factor(
        [crystal], charges=crystal.arrays["charges"], kmax=4.0, temperature=1000.0
    )
    np.testing.assert_allclose(from_file["S"], given["S"], rtol=1e-6)  # extxyz keeps 8 decimals
    n = len(crystal) / crystal.get_volume()
    np.testing.assert_allclose(from_file["sl_slope"], KB * 1000.0 / (4 * np.pi * COULOMB * n), rtol=1e-12)
    plot_sqq({"rattled": from_file}, tmp_path / "sqq.png")
    assert (tmp_path / "sqq.png").stat().st_size > 5000


def test_sqq_block_errors_see_correlated_frames():
    """Each frame repeated m times (perfectly correlated runs): blocks of m recover the true error."""
    rng = np.random.default_rng(3)
    n, box, n_independent, m = 24, 9.0, 20, 6
    frames = [
        Atoms("NaCl" * (n // 2), positions=rng.uniform(0, box, (n, 3)), cell=[box] * 3, pbc=True)
        for _ in range(n_independent)
    ]
    z = {"Na": 1, "Cl": -1}
    kw = dict(charges=z, kmax=2.0, temperature=1000.0)
    independent = charge_structure_factor(frames, **kw)
    repeated = [a for a in frames for _ in range(m)]
    naive = charge_structure_factor(repeated, **kw)
    blocked = charge_structure_factor(repeated, n_blocks=n_independent, **kw)
    np.testing.assert_allclose(naive["S"], independent["S"], rtol=1e-12)
    # the per-frame error shrinks as if there were m times more data; the block error does not
    np.testing.assert_allclose(
        naive["S_err"],
        independent["S_err"] * np.sqrt((n_independent - 1) / (n_independent * m - 1)),
        rtol=1e-10,
    )
    np.testing.assert_allclose(blocked["S_err"], independent["S_err"], rtol=1e-10)
    one_per_block = charge_structure_factor(frames, n_blocks=n_independent, **kw)
    np.testing.assert_allclose(one_per_block["S_err"], independent["S_err"], rtol=1e-12)
    with pytest.raises(ValueError, match="n_blocks must lie in"):
        charge_structure_factor(frames, n_blocks=1, **kw)
    with pytest.raises(ValueError, match="n_blocks must lie in"):
        charge_structure_factor(frames, n_blocks=n_independent + 1, **kw)


def test_sqq_bad_input():
    crystal = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
    molecule_ = molecule("H2O")
    with pytest.raises(ValueError, match="periodic 3D cell"):
        charge_structure_factor([molecule_], charges=[0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="charges has length 3, the frames have 8"):
        charge_structure_factor([crystal], charges=[1.0, -1.0, 0.0])
    with pytest.raises(ValueError, match="no per-atom charges"):
        charge_structure_factor([crystal])
    with pytest.raises(ValueError, match=r"no charge given for element\(s\) \['Cl'\]"):
        charge_structure_factor([crystal], charges={"Na": 1})
    with pytest.raises(ValueError, match="no reciprocal-lattice vector"):
        charge_structure_factor([crystal], charges={"Na": 1, "Cl": -1}, kmax=0.1)
    other = crystal.copy()
    other.set_cell(other.cell * 1.01, scale_atoms=True)
    with pytest.raises(ValueError, match="different cell"):
        charge_structure_factor([crystal, other], charges={"Na": 1, "Cl": -1})
    with pytest.raises(ValueError, match="no frames"):
        charge_structure_factor([], charges={"Na": 1})


# ---------------------------------------------------------------- dielectric constant


def _dipole_gas(n_mol=20, q=0.5, d=1.0, box=15.0, n_frames=2000, seed=0):
    """Fixed centres, independent random orientations of ±q pairs of length d every frame."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(3.0, box - 3.0, (n_mol, 3))
    frames = []
    for _ in range(n_frames):
        u = rng.normal(size=(n_mol, 3))
        u /= np.linalg.norm(u, axis=1, keepdims=True)
        pos = np.concatenate([centres + 0.5 * d * u, centres - 0.5 * d * u])
        frames.append(Atoms("H" * (2 * n_mol), positions=pos, cell=[box] * 3, pbc=True))
    charges = np.concatenate([np.full(n_mol, q), np.full(n_mol, -q)])
    return frames, charges


def test_dielectric_constant_of_a_dipole_gas(tmp_path):
    n_mol, q, d, box, temp = 20, 0.5, 1.0, 15.0, 300.0
    frames, charges = _dipole_gas(n_mol, q, d, box)
    res = dielectric_constant(frames, charges=charges, temperature=temp, n_blocks=10)
    # ⟨M²⟩ = N q² d² for independent orientations, ⟨M⟩ = 0
    exact = 1 + 4 * np.pi * COULOMB / (KB * temp) * n_mol * q**2 * d**2 / (3 * box**3)
    assert abs(res["epsilon"] - exact) < 4 * res["epsilon_err"] and abs(res["epsilon"] / exact - 1) < 0.08
    # the estimator is exactly the fluctuation formula on the sample
    m = res["M"]
    fluct = np.mean(np.sum(m**2, 1)) - np.sum(m.mean(0) ** 2)
    np.testing.assert_allclose(res["M2_fluct"], fluct, rtol=1e-10)
    np.testing.assert_allclose(res["running"][-1], res["epsilon"], rtol=1e-12)
    # the same from dipoles given directly
    again = dielectric_constant(frames, dipoles=m, temperature=temp, n_blocks=10)
    np.testing.assert_allclose(again["epsilon"], res["epsilon"], rtol=1e-12)
    plot_dielectric({"dipole gas": res}, tmp_path / "eps.png")
    assert (tmp_path / "eps.png").stat().st_size > 5000


def test_dielectric_unwraps_periodic_positions():
    frames, charges = _dipole_gas(n_frames=200)
    wrapped = []
    for atoms in frames:
        atoms = atoms.copy()
        atoms.positions += [7.0, 0.0, 0.0]  # pushes some atoms through the boundary
        atoms.wrap()
        wrapped.append(atoms)
    a = dielectric_constant(frames, charges=charges, temperature=300.0)
    b = dielectric_constant(wrapped, charges=charges, temperature=300.0)
    np.testing.assert_allclose(b["epsilon"], a["epsilon"], rtol=1e-10)


def test_dielectric_bad_input():
    frames, charges = _dipole_gas(n_frames=10)
    with pytest.raises(ValueError, match="no velocities"):
        dielectric_constant(frames, charges=charges)
    with pytest.raises(ValueError, match="dipoles has shape"):
        dielectric_constant(frames, dipoles=np.zeros((9, 3)), temperature=300.0)
    with pytest.raises(ValueError, match="charges has shape"):
        dielectric_constant(frames, charges=np.zeros((9, 40)), temperature=300.0)
    no_cell = [Atoms("H2", positions=[[0, 0, 0], [0, 0, 1]])] * 4
    with pytest.raises(ValueError, match="needs a volume"):
        dielectric_constant(no_cell, charges=[1.0, -1.0], temperature=300.0, n_blocks=2)


# ---------------------------------------------------------------- conductivity


def _ou_ions(n_ions, taus, s, dt, n_frames, seed):
    """Independent Ornstein–Uhlenbeck velocities; positions by the trapezoid rule (exact D known)."""
    rng = np.random.default_rng(seed)
    a = np.exp(-dt / np.asarray(taus))[None, :, None]
    vel = np.empty((n_frames, n_ions, 3))
    vel[0] = s * rng.normal(size=(n_ions, 3))
    noise = s * np.sqrt(1 - a[0] ** 2) * rng.normal(size=(n_frames, n_ions, 3))
    for t in range(1, n_frames):
        vel[t] = a[0] * vel[t - 1] + noise[t]
    pos = np.concatenate([np.zeros((1, n_ions, 3)), np.cumsum(0.5 * dt * (vel[1:] + vel[:-1]), axis=0)])
    diffusion = dt * s**2 * (1 + a[0, :, 0]) / (2 * (1 - a[0, :, 0]))  # Å²/fs, exact for this scheme
    return pos, vel, diffusion


def test_green_kubo_equals_einstein_helfand_for_brownian_ions(tmp_path):
    n_ions, dt, s, temp, volume = 32, 2.0, 0.01, 1200.0, 2000.0
    taus = np.where(np.arange(n_ions) < n_ions // 2, 10.0, 25.0)
    z = np.where(np.arange(n_ions) < n_ions // 2, 1.0, -1.0)
    pos, vel, diffusion = _ou_ions(n_ions, taus, s, dt, 24000, seed=3)
    res = conductivity_from_arrays(pos, vel, z, volume, temp, dt, max_lag=250.0, fit_start=125.0, n_blocks=8)
    exact = (
        np.sum(z**2 * diffusion) / (volume * KB * temp) * SIEMENS_PER_M
    )  # Nernst–Einstein, independent ions
    gk, gk_err, eh, eh_err = res["sigma_gk"], res["sigma_gk_err"], res["sigma_eh"], res["sigma_eh_err"]
    assert 0 < gk_err < 0.15 * exact and 0 < eh_err < 0.15 * exact
    assert abs(gk - exact) < 4 * gk_err, (gk, gk_err, exact)
    assert abs(eh - exact) < 4 * eh_err, (eh, eh_err, exact)
    assert abs(gk - eh) < 3 * np.hypot(gk_err, eh_err), (gk, eh)
    assert abs(res["sigma_nernst_einstein"] / exact - 1) < 0.1
    plot_conductivity({"Brownian": res}, tmp_path / "sigma.png")
    assert (tmp_path / "sigma.png").stat().st_size > 5000


def test_ionic_conductivity_from_a_wrapped_ase_trajectory():
    n_ions, dt, box = 8, 2.0, 6.0
    pos, vel, _ = _ou_ions(n_ions, [10.0] * n_ions, 0.02, dt, 1000, seed=4)
    pos += np.random.default_rng(5).uniform(0, box, (1, n_ions, 3))
    frames = []
    for p, v in zip(pos, vel):
        atoms = Atoms("Na4Cl4", positions=p, cell=[box] * 3, pbc=True)
        atoms.set_velocities(v / units.fs)
        atoms.wrap()
        frames.append(atoms)
    z = np.array([1.0] * 4 + [-1.0] * 4)
    ref = conductivity_from_arrays(pos, vel, z, box**3, 1000.0, dt, max_lag=40.0, n_blocks=4)
    res = ionic_conductivity(
        frames, dt=dt, temperature=1000.0, max_lag=40.0, n_blocks=4
    )  # Na, Cl: known ions
    for key in ("sigma_gk", "sigma_eh", "sigma_gk_err", "sigma_eh_err"):
        np.testing.assert_allclose(res[key], ref[key], rtol=1e-9)
    explicit = ionic_conductivity(
        frames, dt=dt, oxidation_numbers={"Na": 1, "Cl": -1}, temperature=1000.0, max_lag=40.0, n_blocks=4
    )
    np.testing.assert_allclose(explicit["sigma_gk"], res["sigma_gk"], rtol=1e-12)


def test_ionic_conductivity_bad_input():
    water = [molecule("H2O", vacuum=3.0, pbc=True)] * 50
    with pytest.raises(ValueError, match="not known monatomic ions; pass oxidation_numbers"):
        ionic_conductivity(water, dt=1.0, temperature=300.0)
    with pytest.raises(ValueError, match="oxidation_numbers has shape"):
        ionic_conductivity(water, dt=1.0, oxidation_numbers=[1, -1], temperature=300.0)
    with pytest.raises(ValueError, match="no velocities"):
        ionic_conductivity(water, dt=1.0, oxidation_numbers=[0, 0.5, -0.5], temperature=300.0)
    pos = np.zeros((100, 2, 3))
    with pytest.raises(ValueError, match="max_lag must span"):
        conductivity_from_arrays(pos, pos, np.array([1.0, -1.0]), 100.0, 300.0, 1.0, max_lag=50.0)
    with pytest.raises(ValueError, match="charges has shape"):
        conductivity_from_arrays(pos, pos, np.array([1.0]), 100.0, 300.0, 1.0, max_lag=5.0)


# ---------------------------------------------------------------- size consistency


@pytest.fixture(scope="module")
def base_model():
    base = torch.load(DATA / "base_mace.model", weights_only=False, map_location="cpu")
    return mace_lr.augment(base, [])


def _ion(name, charge):
    atoms = (
        molecule(name)
        if name != "NH4"
        else Atoms(
            "NH4",
            positions=[
                [0, 0, 0],
                [0.63, 0.63, 0.63],
                [-0.63, -0.63, 0.63],
                [-0.63, 0.63, -0.63],
                [0.63, -0.63, -0.63],
            ],
        )
    )
    atoms.info["charge"] = charge
    return atoms


def test_size_consistency_is_zero_for_the_base_model(base_model, tmp_path):
    water, ammonium = _ion("H2O", 0.0), _ion("NH4", 1.0)
    neutral = size_consistency(base_model, water, _ion("CH3OH", 0.0), distance=[12.0, 40.0])
    charged = size_consistency(base_model, ammonium, ammonium, distance=[12.0, 40.0])
    assert np.abs(neutral["delta"]).max() < 1e-8 and np.abs(charged["delta"]).max() < 1e-8
    np.testing.assert_allclose(charged["coulomb_tail"], COULOMB / np.array([12.0, 40.0]))
    # a long-range model is not zero at 12 Å, and its interaction decays with distance
    les = perturb_blocks(mace_lr.augment(base_model, "les"))
    lr = size_consistency(les, ammonium, ammonium, distance=[12.0, 40.0])
    assert abs(lr["delta"][0]) > 1e-4 and abs(lr["delta"][1]) < abs(lr["delta"][0])
    plot_size_consistency({"base": charged, "LES (perturbed)": lr}, tmp_path / "size.png")
    assert (tmp_path / "size.png").stat().st_size > 5000


def test_size_consistency_bad_input(base_model):
    water = _ion("H2O", 0.0)
    with pytest.raises(ValueError, match="periodic"):
        size_consistency(base_model, molecule("H2O", vacuum=3.0, pbc=True), water)
    with pytest.raises(ValueError, match="does not separate"):
        size_consistency(base_model, water, water, distance=[0.5])


# ---------------------------------------------------------------- command line


def test_cli_sqq_dielectric_conductivity(tmp_path, capsys):
    from mace_lr.cli.analyze import main

    crystal = bulk("NaCl", "rocksalt", a=5.64, cubic=True).repeat((2, 2, 2))
    pos, vel, _ = _ou_ions(len(crystal), [10.0] * len(crystal), 0.02, 2.0, 400, seed=6)
    frames = []
    for p, v in zip(pos, vel):
        atoms = crystal.copy()
        atoms.positions += 0.05 * p
        atoms.set_velocities(v / units.fs)
        atoms.arrays["MACE_charges"] = np.where(atoms.numbers == 11, 0.9, -0.9)
        frames.append(atoms)
    traj = tmp_path / "md.extxyz"
    write(traj, frames)
    png, out = tmp_path / "sqq.png", tmp_path / "sqq.json"
    assert (
        main(
            [
                "sqq",
                str(traj),
                "--charges_key",
                "MACE_charges",
                "--kmax",
                "2.5",
                "--plot",
                str(png),
                "--json",
                str(out),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "Stillinger-Lovett slope" in text and png.stat().st_size > 5000
    import json

    res = json.loads(out.read_text())
    direct = charge_structure_factor(frames, charges={"Na": 0.9, "Cl": -0.9}, kmax=2.5)
    np.testing.assert_allclose(res["S"], direct["S"], rtol=1e-6)

    assert main(["dielectric", str(traj), "--charges", "Na=1,Cl=-1", "--temperature", "1000"]) == 0
    assert "epsilon = " in capsys.readouterr().out

    assert main(["conductivity", str(traj), "--dt", "2", "--max_lag", "20", "--n_blocks", "4"]) == 0
    text = capsys.readouterr().out
    assert "Green-Kubo" in text and "Einstein-Helfand" in text and "S/m" in text

    with pytest.raises(SystemExit, match="no per-atom array 'charges'"):
        main(["sqq", str(traj)])
    with pytest.raises(SystemExit, match="not known monatomic ions"):
        water = molecule("H2O", vacuum=3.0, pbc=True)
        write(tmp_path / "w.extxyz", [water] * 20)
        main(["conductivity", str(tmp_path / "w.extxyz"), "--dt", "1", "--temperature", "300"])
