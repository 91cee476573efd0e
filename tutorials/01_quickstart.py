"""Quickstart: add a long-range LES block to a MACE model, fine-tune it, and use it in ASE.

What this script does, step by step:

1. generates a tiny reference dataset of NaCl clusters with GFN2-xTB (``tblite``):
   energies, forces and dipole moments, open boundaries;
2. builds a small MACE model (or loads yours with ``--base my_mace.model``);
3. attaches a Latent Ewald Summation (LES) block with ``mace_lr.augment`` — the new model
   predicts exactly what the base predicts until it is trained;
4. fine-tunes it for a few epochs in plain PyTorch on energies, forces and dipoles;
5. saves it with ``mace_lr.save`` and loads it in the ASE calculator ``MACELRCalculator``;
6. prints energy, forces, stress, charges and Born effective charges;
7. runs a short NVE molecular dynamics and reports the energy drift.

Run it::

    python tutorials/01_quickstart.py            # ~ a few minutes on a laptop CPU
    python tutorials/01_quickstart.py --fast     # < 1 minute, fewer epochs and MD steps
    python tutorials/01_quickstart.py --base my_mace.model --out my_dir --threads 4

Everything the script writes goes to ``--out`` (default ``tutorial_out/``).

Units are ASE's throughout: Å, eV, e, eV/Å, e·Å, and V/Å for electric fields.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

# Building e3nn/MACE modules compiles small TorchScript kernels, which emit warnings that
# say nothing about your model. Silence those (and only those) to keep the output readable.
warnings.filterwarnings("ignore", message="The TorchScript type system")
warnings.filterwarnings("ignore", message="Environment variable TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
warnings.filterwarnings("ignore", message="To copy construct from a tensor")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from ase import Atoms, units  # noqa: E402
from ase.build import bulk  # noqa: E402
from ase.md import velocitydistribution as vd  # noqa: E402
from ase.md.verlet import VelocityVerlet  # noqa: E402

import mace_lr  # noqa: E402  (imports mace first, as e3nn needs)
from mace_lr._data import atoms_to_batch  # noqa: E402

NA, CL = 11, 17


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--base",
        type=Path,
        default=None,
        help="a MACE model file (e.g. from mace_run_train) that knows Na and Cl; "
        "default: build a small random MACE model",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("tutorial_out"),
        help="folder for the files this script writes (default: tutorial_out/)",
    )
    parser.add_argument("--fast", action="store_true", help="fewer epochs and MD steps (< 1 minute)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads for torch (default 1: these systems are tiny, more "
        "threads add overhead and suffer when other jobs share the CPU)",
    )
    return parser.parse_args()


# ---------------------------------------------------------------------------------------
# 1. Reference data: NaCl clusters with GFN2-xTB
# ---------------------------------------------------------------------------------------


def nacl_cube(edge: float) -> Atoms:
    """Na4Cl4: a 2x2x2 piece of rock salt with nearest-neighbour distance ``edge`` Å."""
    grid = np.array([[i, j, k] for i in range(2) for j in range(2) for k in range(2)], float)
    numbers = [NA if (i + j + k) % 2 == 0 else CL for i, j, k in grid.astype(int)]
    return Atoms(numbers=numbers, positions=grid * edge)


def make_dataset(rng: np.random.Generator) -> list[Atoms]:
    """~30 small neutral NaCl clusters at different geometries, labelled by GFN2-xTB.

    Labels are stored on each ``Atoms``: ``info["ref_energy"]`` (eV),
    ``arrays["ref_forces"]`` (eV/Å), ``info["ref_dipole"]`` (e·Å) and
    ``arrays["ref_charges"]`` (Mulliken charges, e; for comparison only).
    """
    from tblite.ase import TBLite

    structures = []
    # NaCl ion pairs, compressed to stretched (the GFN2 bond length is ~2.36 Å)
    for d in np.linspace(2.1, 3.4, 8):
        structures.append(Atoms("NaCl", positions=[[0.0, 0.0, 0.0], [d, 0.0, 0.0]]))
    # Na2Cl2 rhombi
    for s in np.linspace(2.45, 2.8, 8):
        square = Atoms("NaClNaCl", positions=[[0, 0, 0], [s, 0, 0], [s, s, 0], [0, s, 0]])
        square.positions += rng.normal(scale=0.08, size=(4, 3))
        structures.append(square)
    # Na4Cl4 cubes, rattled (the MD below runs on this cluster)
    for edge in np.linspace(2.55, 2.85, 16):
        cube = nacl_cube(edge)
        cube.positions += rng.normal(scale=0.1, size=(8, 3))
        structures.append(cube)

    for atoms in structures:
        # open boundaries (no cell, pbc=False); centre at the origin so that the model's
        # dipole Σ q_i r_i and the reference dipole refer to the same origin
        atoms.positions -= atoms.positions.mean(0)
        atoms.pbc = False
        atoms.calc = TBLite(method="GFN2-xTB", verbosity=0)
        atoms.info["ref_energy"] = atoms.get_potential_energy()
        atoms.arrays["ref_forces"] = atoms.get_forces()
        atoms.info["ref_dipole"] = atoms.get_dipole_moment()
        atoms.arrays["ref_charges"] = atoms.get_charges()
        atoms.calc = None
    return structures


# ---------------------------------------------------------------------------------------
# 2. The base MACE model
# ---------------------------------------------------------------------------------------


def fit_reference_energies(dataset: list[Atoms]) -> dict[int, float]:
    """Per-element reference energies E0 by least squares: E ≈ n_Na E0(Na) + n_Cl E0(Cl).

    The model then learns only what is left, the binding energy. All our clusters are
    neutral (n_Na = n_Cl), so only E0(Na) + E0(Cl) is determined; ``lstsq`` returns the
    split with the smallest norm, which is fine as long as we simulate neutral NaCl.
    (MACE's usual alternative: isolated-atom energies computed with the same method.)
    """
    counts = np.array([[np.sum(a.numbers == NA), np.sum(a.numbers == CL)] for a in dataset], float)
    energies = np.array([a.info["ref_energy"] for a in dataset])
    e0, *_ = np.linalg.lstsq(counts, energies, rcond=None)
    return {NA: float(e0[0]), CL: float(e0[1])}


def build_base(e0: dict[int, float], force_rms: float) -> torch.nn.Module:
    """A small ScaleShiftMACE for Na and Cl (random weights, float64)."""
    from e3nn import o3
    from mace.modules import RealAgnosticResidualInteractionBlock, ScaleShiftMACE

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # mace builds its parameters in the default dtype
    try:
        model = ScaleShiftMACE(
            r_max=5.0,  # Å: short-range cutoff; the LES block sees all distances
            num_bessel=8,
            num_polynomial_cutoff=5,
            max_ell=2,
            interaction_cls=RealAgnosticResidualInteractionBlock,
            interaction_cls_first=RealAgnosticResidualInteractionBlock,
            num_interactions=2,
            num_elements=2,
            hidden_irreps=o3.Irreps("16x0e+16x1o"),
            MLP_irreps=o3.Irreps("16x0e"),
            atomic_energies=np.array([e0[NA], e0[CL]]),
            avg_num_neighbors=4.0,
            atomic_numbers=[NA, CL],
            correlation=2,
            gate=torch.nn.functional.silu,
            # MACE's usual scaling: interaction energies in units of the RMS force
            atomic_inter_scale=force_rms,
            atomic_inter_shift=0.0,
        )
    finally:
        torch.set_default_dtype(previous)
    return model


def load_base(path: Path, e0: dict[int, float]) -> torch.nn.Module:
    """Load a MACE model file and put the GFN2-xTB reference energies into it.

    MACE model files are pickled modules: ``weights_only=False`` runs code from the file,
    so only load files you trust.
    """
    model = torch.load(path, map_location="cpu", weights_only=False).to(torch.float64)
    z = [int(x) for x in model.atomic_numbers.tolist()]
    if NA not in z or CL not in z:
        raise SystemExit(f"{path} does not know Na and Cl (its elements: {z})")
    # The base was trained against another reference (e.g. DFT); our labels are GFN2-xTB,
    # so its E0s must be replaced by ours or every energy would be off by a constant.
    with torch.no_grad():
        table = model.atomic_energies_fn.atomic_energies  # [n_elements] or [n_heads, n_elements]
        for element, value in e0.items():
            table[..., z.index(element)] = value
    return model


# ---------------------------------------------------------------------------------------
# 4. Fine-tuning in plain PyTorch
# ---------------------------------------------------------------------------------------


def labels(dataset: list[Atoms]) -> dict[str, torch.Tensor]:
    return {
        "energy": torch.tensor([a.info["ref_energy"] for a in dataset]),
        "forces": torch.tensor(np.concatenate([a.arrays["ref_forces"] for a in dataset])),
        "dipole": torch.tensor(np.stack([a.info["ref_dipole"] for a in dataset])),
        "n_atoms": torch.tensor([len(a) for a in dataset], dtype=torch.float64),
    }


def errors(out: dict, ref: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """RMS errors: energy per atom (eV/atom), force components (eV/Å), dipoles (e·Å)."""
    return {
        "energy": ((out["energy"] - ref["energy"]) / ref["n_atoms"]).pow(2).mean().sqrt(),
        "forces": (out["forces"] - ref["forces"]).pow(2).mean().sqrt(),
        "dipole": (out["dipole"] - ref["dipole"]).pow(2).mean().sqrt(),
    }


def fine_tune(model: mace_lr.LongRangeMACE, dataset: list[Atoms], epochs: int) -> dict[str, float]:
    # The whole (tiny) dataset is one batch. `atoms_to_batch` builds the neighbour graph
    # and the long-range inputs (total charge, external field) from each Atoms object.
    batch = atoms_to_batch(dataset, model.atomic_numbers, model.r_max, heads=model.heads, dtype=torch.float64)
    ref = labels(dataset)
    les = model.blocks["les"]
    # LES starts with coupling γ = max(a, 0) = 0 (silent block) and reports charges
    # √γ·q̃. At γ = 0 the dipole has no gradient with respect to a (d√γ/dγ is infinite
    # there, so the block defines it as 0): only the energy and force terms move a.
    # A small positive start (the block option `coupling_init`) lets the dipole loss
    # shape the charges from the first step.
    with torch.no_grad():
        les.coupling.fill_(0.05)

    # Here we train every parameter (base and block). To keep a good pretrained base
    # untouched, pass only `model.blocks.parameters()` instead.
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs, eta_min=1e-3)
    weights = {"energy": 10.0, "forces": 1.0, "dipole": 1.0}
    model.train()
    report_every = max(1, epochs // 10)
    print(f"{'epoch':>6} {'loss':>10} {'E meV/atom':>11} {'F meV/Å':>9} {'μ e·Å':>8} {'γ':>7}")
    for epoch in range(1, epochs + 1):
        optimizer.zero_grad()
        # training=True keeps the graph so that the force and dipole errors (both
        # derivatives of the energy) can themselves be differentiated
        out = model(batch, training=True, compute_force=True, compute_dipole=True)
        err = errors(out, ref)
        loss = sum(weights[k] * err[k] ** 2 for k in weights)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if epoch % report_every == 0 or epoch == 1:
            print(
                f"{epoch:6d} {loss.item():10.4g} {1e3 * err['energy'].item():11.2f} "
                f"{1e3 * err['forces'].item():9.1f} {err['dipole'].item():8.3f} "
                f"{les.coupling.item():7.3f}"
            )
    model.eval()
    out = model(batch, training=False, compute_force=True, compute_dipole=True)
    return {k: float(v.detach()) for k, v in errors(out, ref).items()}


# ---------------------------------------------------------------------------------------
# 7. NVE molecular dynamics
# ---------------------------------------------------------------------------------------


def thermalize(atoms: Atoms, temperature_k: float, rng: np.random.Generator) -> None:
    if hasattr(vd, "thermalize_momenta"):  # ase >= 3.29
        vd.thermalize_momenta(atoms, temperature_k, rng=rng)
    else:
        vd.MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_k, rng=rng)
    vd.Stationary(atoms)  # no centre-of-mass motion
    vd.ZeroRotation(atoms)  # no overall rotation (open cluster)


def run_nve(calc, steps: int, timestep_fs: float, rng: np.random.Generator, out_dir: Path):
    atoms = nacl_cube(2.7)
    atoms.positions -= atoms.positions.mean(0)
    atoms.calc = calc
    thermalize(atoms, 300.0, rng)
    dyn = VelocityVerlet(atoms, timestep=timestep_fs * units.fs)
    rows = []

    def record():
        rows.append(
            (
                dyn.get_time() / (1000 * units.fs),
                atoms.get_potential_energy(),
                atoms.get_kinetic_energy(),
                atoms.get_temperature(),
            )
        )

    dyn.attach(record, interval=1)
    start = time.perf_counter()
    dyn.run(steps)
    seconds = time.perf_counter() - start
    data = np.array(rows)  # time (ps), E_pot, E_kin, T
    np.savetxt(out_dir / "nve.csv", data, delimiter=",", header="time_ps,epot_eV,ekin_eV,T_K")
    total = (data[:, 1] + data[:, 2]) / len(atoms)  # eV/atom
    drift = np.polyfit(data[:, 0], total, 1)[0]  # eV/atom/ps, slope of a straight-line fit
    return {
        "drift": float(drift),
        "max_dev": float(np.abs(total - total[0]).max()),
        "mean_T": float(data[1:, 3].mean()),
        "time_ps": float(data[-1, 0]),
        "ms_per_step": 1e3 * seconds / steps,
    }


# ---------------------------------------------------------------------------------------


def main() -> None:
    args = parse_args()
    t_start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    epochs = 60 if args.fast else 300
    md_steps = 150 if args.fast else 1000

    # 1. reference data ------------------------------------------------------------------
    t0 = time.perf_counter()
    dataset = make_dataset(rng)
    print(f"[1] {len(dataset)} NaCl clusters labelled with GFN2-xTB in {time.perf_counter() - t0:.1f} s")
    from ase.io import write

    write(args.out / "nacl_gfn2.extxyz", dataset)  # keep the data for later

    # 2. the base model -----------------------------------------------------------------
    e0 = fit_reference_energies(dataset)
    if args.base is not None:
        base = load_base(args.base, e0)
        print(f"[2] loaded base model {args.base}")
    else:
        force_rms = float(np.sqrt(np.mean(np.concatenate([a.arrays["ref_forces"] for a in dataset]) ** 2)))
        base = build_base(e0, force_rms)
        print(f"[2] built a small random MACE model ({sum(p.numel() for p in base.parameters())} parameters)")
    print(f"    reference energies E0: Na {e0[NA]:.3f} eV, Cl {e0[CL]:.3f} eV")

    # 3. attach the LES block ------------------------------------------------------------
    # `augment` wraps the (untouched) MACE model; "les" is the block's registry name and
    # smearing is the Gaussian width of its charges in Å.
    model = mace_lr.augment(base, "les", smearing=1.0)
    check = atoms_to_batch(dataset[:3], model.atomic_numbers, model.r_max, heads=model.heads)
    with torch.no_grad():
        e_base = base(dict(check), compute_force=False)["energy"]
    e_aug = model(check, compute_force=False)["energy"].detach()
    print(
        f"[3] attached LES ({sum(p.numel() for p in model.blocks.parameters())} parameters); "
        f"at initialisation |E_augmented - E_base| = {float((e_aug - e_base).abs().max()):.1e} eV"
    )

    # 4. fine-tune ----------------------------------------------------------------------
    print(f"[4] fine-tuning for {epochs} epochs (energy + forces + dipole)")
    t0 = time.perf_counter()
    final = fine_tune(model, dataset, epochs)
    train_seconds = time.perf_counter() - t0

    # 5. save, then load in the ASE calculator ------------------------------------------
    path = args.out / "nacl_les.model"
    mace_lr.save(model, path)  # safe format: plain data + weights, no pickled code
    calc = mace_lr.MACELRCalculator(model_paths=str(path), device="cpu", default_dtype="float64")
    print(f"[5] saved {path} and loaded it in MACELRCalculator")

    # 6. properties of one structure ----------------------------------------------------
    cluster = dataset[-1].copy()  # a rattled Na4Cl4 cube from the data set
    cluster.calc = calc
    energy = cluster.get_potential_energy()
    forces = cluster.get_forces()
    charges = cluster.get_charges()  # LES charges, e
    dipole = cluster.get_dipole_moment()
    bec = calc.get_property("born_effective_charges", cluster)  # Z[i, α, β] = ∂F_iβ/∂E_α
    print(f"[6] Na4Cl4 cluster: E = {energy:.4f} eV (GFN2-xTB {cluster.info['ref_energy']:.4f} eV)")
    print(
        f"    dipole  = {np.array2string(dipole, precision=3)} e·Å "
        f"(GFN2-xTB {np.array2string(cluster.info['ref_dipole'], precision=3)})"
    )
    print("    atom   F_model (eV/Å)              F_xtb (eV/Å)            q_LES  q_Mulliken  tr(Z)/3")

    def vec(v):
        return np.array2string(v, precision=3, suppress_small=True)

    ref_f, ref_q = cluster.arrays["ref_forces"], cluster.arrays["ref_charges"]
    for i, atom in enumerate(cluster):
        print(
            f"    {atom.symbol:<3} {vec(forces[i]):<26}  {vec(ref_f[i]):<24}"
            f"{charges[i]:6.3f} {ref_q[i]:10.3f} {np.trace(bec[i]) / 3:9.3f}"
        )
    # acoustic sum rule: Σ_i Z_i = (Σ_i q_i) I for a model whose charges move with the atoms
    sum_rule = float(np.abs(bec.sum(0) - charges.sum() * np.eye(3)).max())
    print(f"    Born-charge sum rule |Σ Z_i - Q·I| = {sum_rule:.1e}")

    # The same calculator handles periodic cells (Ewald sums) and reports the stress. The
    # model was trained on clusters only: bulk numbers are an API demonstration, not physics.
    crystal = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
    crystal.calc = calc
    stress_gpa = crystal.get_stress() / units.GPa  # Voigt: xx yy zz yz xz xy
    print(
        f"    rock-salt cell (8 atoms): E = {crystal.get_potential_energy() / len(crystal):.4f} "
        f"eV/atom, stress = {np.array2string(stress_gpa, precision=2)} GPa, "
        f"q(Na) = {crystal.get_charges()[0]:.3f} e"
    )
    # a uniform electric field (V/Å) is read from atoms.info
    cluster.info["external_field"] = np.array([0.0, 0.0, 0.01])
    de = cluster.get_potential_energy() - energy
    print(f"    field 0.01 V/Å along z: ΔE = {de:.5f} eV (-E·μ = {-0.01 * dipole[2]:.5f} eV)")

    # 7. NVE molecular dynamics ---------------------------------------------------------
    timestep = 1.0
    print(f"[7] NVE: Na4Cl4, 300 K, {md_steps} steps of {timestep} fs (velocity Verlet)")
    md = run_nve(calc, md_steps, timestep, rng, args.out)

    # summary -----------------------------------------------------------------------------
    les = calc.model.blocks["les"]
    rows = [
        ("training structures", f"{len(dataset)}"),
        ("epochs", f"{epochs} ({train_seconds:.0f} s)"),
        ("energy RMSE (meV/atom)", f"{1e3 * final['energy']:.2f}"),
        ("force RMSE (meV/Å)", f"{1e3 * final['forces']:.1f}"),
        ("dipole RMSE (e·Å)", f"{final['dipole']:.3f}"),
        ("LES coupling γ", f"{float(les.coupling):.4f}"),
        (
            "Na4Cl4 LES charges (e)",
            f"Na {charges[cluster.numbers == NA].mean():+.3f}, "
            f"Cl {charges[cluster.numbers == CL].mean():+.3f}",
        ),
        ("Born sum-rule error (e)", f"{sum_rule:.1e}"),
        ("NVE length (ps)", f"{md['time_ps']:.3f} ({md['ms_per_step']:.0f} ms/step)"),
        ("NVE mean temperature (K)", f"{md['mean_T']:.0f}"),
        ("NVE max |ΔE| (eV/atom)", f"{md['max_dev']:.2e}"),
        ("NVE energy drift (eV/atom/ps)", f"{md['drift']:+.2e}"),
        ("wall time (s)", f"{time.perf_counter() - t_start:.0f}"),
        ("files", f"{args.out}/"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n" + "=" * 30 + " summary " + "=" * 30)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
