"""Real MACE files from older mace-torch releases: augment → save → load → fine-tune.

The two models in ``../shared/foundation/`` (beside the repository clone; provenance in its
README) were trained by others and pickled by a mace-torch older than 0.3.14, as the
released foundation models are. ``MACE_LR_FOUNDATION_DIR`` points elsewhere.
"""

import json
import os
import pathlib
import subprocess
import sys

import ase.io
import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule

import mace_lr
from mace_lr import _mace_adapter as adapter
from mace_lr import testing as T
from mace_lr.cli import run_train as cli

REPO = pathlib.Path(__file__).resolve().parents[1]
FOUNDATION = pathlib.Path(os.environ.get("MACE_LR_FOUNDATION_DIR", REPO.parent / "shared" / "foundation"))
FILES = ("ani500k_small_CC.model", "gesbte_swa.model")

MISSING = (
    f"the real MACE files {', '.join(FILES)} are not in {FOUNDATION} (shared/foundation beside "
    "the repository clone, or set MACE_LR_FOUNDATION_DIR)"
)

#: every installed block except the registry-test fixtures (tests/fixture_plugin)
BLOCKS = [name for name in mace_lr.available_blocks() if not name.startswith("fixture_")]

#: block options per model file; wannier centroids must leave every structure neutral:
#: water's O carries 8 electrons; in GeSbTe each atom's valence electrons sit on its centroid
OPTIONS = {
    "ani500k_small_CC.model": {"wannier": {"centroid_electrons": {"O": 8}}},
    "gesbte_swa.model": {"wannier": {"centroid_electrons": {"Ge": 4, "Sb": 5, "Te": 6}}},
}


def _water_box(seed=0):
    """Four rattled water molecules in a 6.2 Å periodic cube (12 atoms)."""
    rng = np.random.default_rng(seed)
    box = Atoms(cell=np.eye(3) * 6.2, pbc=True)
    for corner in ([0.8, 0.8, 0.8], [3.9, 3.9, 0.8], [3.9, 0.8, 3.9], [0.8, 3.9, 3.9]):
        w = molecule("H2O")
        w.rotate(rng.uniform(0, 360), rng.normal(size=3))
        w.translate(corner)
        box += w
    box.positions += rng.normal(scale=0.03, size=box.positions.shape)
    return box


def _gesbte(seed=0):
    """Rattled rock-salt GeTe cube with one Ge replaced by Sb (8 atoms, periodic)."""
    rng = np.random.default_rng(seed)
    atoms = bulk("GeTe", "rocksalt", a=6.0, cubic=True)
    atoms.numbers[0] = 51
    atoms.positions += rng.normal(scale=0.08, size=atoms.positions.shape)
    return atoms


def _systems(name, block=None):
    """Periodic and open structures of the model's elements (neutral for every block)."""
    if name.startswith("ani"):
        dimer = molecule("H2O") + molecule("H2O")
        dimer.positions[3:] += [2.9, 0.2, 0.1]
        systems = [_water_box(), dimer] + ([] if block == "wannier" else [molecule("CH3CH2OH")])
    else:
        cluster = _gesbte(1)[:4]
        cluster.pbc = False
        systems = [_gesbte(), cluster]
    for atoms in systems:
        atoms.info["charge"] = 0
    return systems


@pytest.fixture(scope="module", params=FILES)
def base(request):
    if not all((FOUNDATION / name).is_file() for name in FILES):
        pytest.skip(MISSING)
    return request.param, torch.load(FOUNDATION / request.param, map_location="cpu", weights_only=False)


def test_files_are_older_than_the_zeroed_buffers(base):
    """The files really are from mace-torch < 0.3.14: the upgrade has something to do."""
    _, model = base
    missing = adapter.missing_buffers(model)
    n_contractions = sum(len(p.symmetric_contractions.contractions) for p in model.products)
    correlation = len(model.products[0].symmetric_contractions.contractions[0].weights) + 1
    assert len(missing) == n_contractions * correlation
    assert all(adapter.ZEROED_BUFFER.search(key) for key in missing)
    assert not any(bool(v) for v in missing.values())  # no coupling matrix of these models vanishes
    assert not hasattr(model, "use_last_readout_only")


def test_every_block_is_identity_on_the_file(base):
    name, model = base
    for block in BLOCKS:
        lr = mace_lr.augment(model, block, **OPTIONS[name].get(block, {}))
        T.assert_identity_at_init(model, lr, _systems(name, block), atol=1e-12)


def _all_blocks(name, model):
    """``model`` with every block attached at once (one save/load covers them all)."""
    return mace_lr.augment(model, {block: OPTIONS[name].get(block, {}) for block in BLOCKS})


def _calculator_results(calc, systems):
    results = []
    for atoms in systems:
        atoms = atoms.copy()
        atoms.calc = calc
        r = {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces()}
        if atoms.pbc.all():
            r["stress"] = atoms.get_stress()
        results.append(r)
    return results


_FRESH_PROCESS = """
import json, sys
import ase.io
import mace_lr
calc = mace_lr.MACELRCalculator(model_paths=sys.argv[1], device="cpu")
res = []
for atoms in ase.io.read(sys.argv[2], index=":"):
    atoms.calc = calc
    r = {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces().tolist()}
    if atoms.pbc.all():
        r["stress"] = atoms.get_stress().tolist()
    res.append(r)
print("RESULTS" + json.dumps(res))
"""


def test_save_and_load_in_a_fresh_process(base, tmp_path):
    """augment (every block) → save → MACELRCalculator in a new interpreter: same results to 1e-12."""
    name, model = base
    systems = _systems(name, "wannier")
    lr = _all_blocks(name, model)
    T.assert_identity_at_init(model, lr, systems, atol=1e-12)
    mace_lr.save(lr, tmp_path / "lr.model")
    ase.io.write(tmp_path / "systems.traj", systems)  # binary: positions exactly as in memory
    proc = subprocess.run(
        [
            sys.executable,
            "-W",
            "ignore",
            "-c",
            _FRESH_PROCESS,
            str(tmp_path / "lr.model"),
            str(tmp_path / "systems.traj"),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.split("RESULTS", 1)[1])
    expected = _calculator_results(mace_lr.MACELRCalculator(model_paths=lr, device="cpu"), systems)
    assert len(got) == len(expected)
    for atoms, ref, res in zip(systems, expected, got):
        assert set(res) == set(ref)
        for key, value in ref.items():
            diff = float(np.abs(np.asarray(res[key]) - value).max())
            assert diff <= 1e-12, f"{atoms.get_chemical_formula()}: {key} differs by {diff:.3g}"


def test_loaded_model_has_the_buffers_installed_mace_builds(base, tmp_path):
    """The buffers filled in on export are exactly those the installed mace builds for the config."""
    name, model = base
    lr = mace_lr.augment(model, "les")
    mace_lr.save(lr, tmp_path / "lr.model")
    loaded = mace_lr.load(tmp_path / "lr.model")
    missing = adapter.missing_buffers(model)
    rebuilt = loaded.base.state_dict()
    assert set(rebuilt) == set(model.state_dict()) | set(missing)
    for key, value in missing.items():
        assert torch.equal(rebuilt[key], value), key
    assert adapter.missing_buffers(loaded.base) == {}
    # the user's model is not modified
    assert not hasattr(model.products[0].symmetric_contractions.contractions[0], "weights_max_zeroed")
    atoms = _systems(name)[0]
    ref, got = T.evaluate(lr, [atoms], compute_stress=True), T.evaluate(loaded, [atoms], compute_stress=True)
    for key in ("energy", "forces", "stress"):
        assert float((ref[key] - got[key]).abs().max()) <= 1e-12, key


def test_file_saved_without_the_buffers_still_loads(tmp_path):
    """Files mace-lr wrote before export added the buffers: those (and only those) are rebuilt."""
    lr = mace_lr.augment(T.make_test_model(), "les")
    mace_lr.save(lr, tmp_path / "m.model")
    payload = torch.load(tmp_path / "m.model", weights_only=True)
    state = payload["base"]["state_dict"]
    zeroed = [key for key in state if adapter.ZEROED_BUFFER.search(key)]
    assert zeroed
    for key in zeroed:
        del state[key]
    torch.save(payload, tmp_path / "old.model")
    loaded = mace_lr.load(tmp_path / "old.model")
    for key, value in lr.base.state_dict().items():
        assert torch.equal(loaded.base.state_dict()[key], value), key
    del state[next(k for k in state if k.endswith("weights_max"))]  # anything else missing: an error
    torch.save(payload, tmp_path / "broken.model")
    with pytest.raises(RuntimeError, match="Missing key.*weights_max"):
        mace_lr.load(tmp_path / "broken.model")


def _labelled(model, name, n=6):
    frames = []
    for seed in range(n):
        atoms = _water_box(seed) if name.startswith("ani") else _gesbte(seed)
        out = T.evaluate(model, [atoms], compute_stress=True)
        atoms.info["REF_energy"] = float(out["energy"][0])
        atoms.arrays["REF_forces"] = out["forces"].numpy()
        frames.append(atoms)
    return frames


@pytest.fixture()
def _restore_root_logger():
    """mace's run_train configures the root logger (level, file handlers); undo it."""
    import logging

    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)


@pytest.mark.usefixtures("_restore_root_logger")
def test_two_epoch_finetune_from_the_file_loads(base, tmp_path):
    name, model = base
    ase.io.write(tmp_path / "train.xyz", _labelled(model, name), format="extxyz")
    cli.main(
        [
            "--name",
            "ft",
            "--foundation_model",
            str(FOUNDATION / name),
            "--lr_blocks",
            "les",
            "--train_file",
            str(tmp_path / "train.xyz"),
            "--valid_fraction",
            "0.34",
            "--energy_key",
            "REF_energy",
            "--forces_key",
            "REF_forces",
            "--E0s",
            "foundation",
            "--max_num_epochs",
            "2",
            "--batch_size",
            "2",
            "--lr",
            "0.001",
            "--device",
            "cpu",
            "--default_dtype",
            "float64",
            "--seed",
            "1",
            "--model_dir",
            str(tmp_path),
            "--checkpoints_dir",
            str(tmp_path / "ckpt"),
            "--log_dir",
            str(tmp_path / "logs"),
            "--results_dir",
            str(tmp_path / "results"),
            "--pin_memory",
            "False",
            "--multiheads_finetuning",
            "False",
        ]
    )
    tuned = mace_lr.load(tmp_path / "ft.model")
    assert list(tuned.blocks) == ["les"]
    # mace keeps the foundation model's elements that the data has (its weights for them)
    elements = sorted(
        {int(z) for atoms in ase.io.read(tmp_path / "train.xyz", index=":") for z in atoms.numbers}
    )
    assert adapter.base_atomic_numbers(tuned.base) == elements
    atoms = _systems(name)[0]
    atoms.calc = mace_lr.MACELRCalculator(model_paths=str(tmp_path / "ft.model"), device="cpu")
    e_tuned = atoms.get_potential_energy()
    e_base = float(T.evaluate(model, [atoms])["energy"][0])
    # two epochs at lr 1e-3 on the base model's own labels move it only a little
    assert np.isfinite(e_tuned) and abs(e_tuned - e_base) < 0.05 * len(atoms)


def _as_2022_file(model):
    """Mutate a built model into mace-torch 0.1.0's layout (plain list and float attributes)."""
    z, r_max = model.atomic_numbers.tolist(), float(model.r_max)
    del model._buffers["atomic_numbers"], model._buffers["r_max"]
    model.atomic_numbers = z
    model.r_max = r_max
    return model


def test_2022_format_fails_clearly(tmp_path, capsys):
    model = _as_2022_file(T.make_test_model())
    message = r"stores `atomic_numbers` as a list and `r_max` as a float .* mace-torch 0\.1\.0"
    with pytest.raises(adapter.UnsupportedMACEVersionError, match=message):
        mace_lr.augment(model, "les")
    for function in (adapter.base_atomic_numbers, adapter.base_r_max, adapter.export_base):
        with pytest.raises(ValueError, match=message):
            function(model)
    torch.save(model, tmp_path / "old.model")
    argv = ["--name", "x", "--foundation_model", str(tmp_path / "old.model"), "--lr_blocks", "les"]
    with pytest.raises(SystemExit):
        cli.main(argv + ["--train_file", str(tmp_path / "none.xyz"), "--model_dir", str(tmp_path)])
    assert "written by mace-torch 0.1.0" in capsys.readouterr().err
