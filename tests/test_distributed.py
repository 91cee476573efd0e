"""mace_lr_run_train --distributed on CPU: two torchrun processes (gloo) against one process.

Run as a script (``python -m torch.distributed.run ... tests/test_distributed.py ARGS``)
this file is ``mace_lr_run_train`` itself, with an observer that saves each rank's
parameters before and after mace's training loop (``DUMP_DIR/{initial,trained}_rank<R>.pt``).
"""

import os
import subprocess
import sys
from unittest import mock

import ase.io
import mace.tools
import numpy as np
import pytest
import torch
from ase import Atoms

import mace_lr
from mace_lr import testing as T
from mace_lr.cli import run_train as cli


def _dumping(train, dump_dir):
    """mace's ``tools.train``, saving the model's parameters before and after it."""

    def dump(model, tag):
        rank = os.environ.get("RANK", "0")
        params = {name: p.detach().clone() for name, p in model.named_parameters()}
        torch.save(params, os.path.join(dump_dir, f"{tag}_rank{rank}.pt"))

    def wrapped(*args, **kwargs):
        dump(kwargs["model"], "initial")
        train(*args, **kwargs)
        dump(kwargs["model"], "trained")

    return wrapped


@pytest.fixture(autouse=True)
def _restore_root_logger():
    """mace's run_train configures the root logger (level, file handlers); undo it."""
    import logging

    root = logging.getLogger()
    level, handlers, filters = root.level, list(root.handlers), list(root.filters)
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.filters[:] = filters
    root.setLevel(level)


def _frames(teacher, sizes, seed):
    """Random Na/Cl clusters of the given sizes, labelled by ``teacher``."""
    rng = np.random.default_rng(seed)
    frames = []
    for n in sizes:
        while True:
            scale = 1.8 * (n / 4) ** (1 / 3)
            atoms = Atoms(numbers=[11, 17] * (n // 2), positions=rng.normal(scale=scale, size=(n, 3)))
            d = atoms.get_all_distances()
            np.fill_diagonal(d, 9.0)
            if d.min() >= 2.0:
                break
        out = T.evaluate(teacher, [atoms], compute_born_charges=True)
        atoms.info["REF_energy"] = float(out["energy"][0])
        atoms.info["REF_dipole"] = out["dipole"][0].numpy()
        atoms.arrays["REF_forces"] = out["forces"].numpy()
        atoms.arrays["REF_born_charges"] = out["born_effective_charges"].numpy().reshape(n, 9)
        frames.append(atoms)
    return frames


def _args(d, name, batch_size):
    return [
        "--name", name,
        "--foundation_model", str(d / "found.model"),
        "--lr_blocks", "les",
        "--lr_config", '{"coupling_init": 0.1}',
        "--train_file", str(d / "train.xyz"),
        "--valid_file", str(d / "valid.xyz"),
        "--energy_key", "REF_energy",
        "--forces_key", "REF_forces",
        "--dipole_key", "REF_dipole",
        "--dipole_weight", "1.0",
        "--born_charges_weight", "1.0",
        "--max_num_epochs", "2",
        "--batch_size", str(batch_size),
        "--valid_batch_size", "2",
        "--device", "cpu",
        "--default_dtype", "float64",
        "--E0s", "{11: -1.0, 17: -2.0}",
        "--seed", "3",
        "--lr", "0.01",
        "--pin_memory", "False",
        "--model_dir", str(d),
        "--checkpoints_dir", str(d / "ckpt"),
        "--log_dir", str(d / "logs"),
        "--results_dir", str(d / "results"),
    ]  # fmt: skip


@pytest.fixture
def _one_thread():
    """One intra-op thread, as in the torchrun processes (OMP_NUM_THREADS=1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_two_cpu_processes_train_like_one_process_on_the_global_batch(tmp_path, _one_thread):
    teacher = T.perturb_blocks(mace_lr.augment(T.make_test_model(seed=5), "les"), scale=0.5)
    # however the 4 structures are split, the ranks hold different numbers of atoms, so only
    # per-atom losses (forces, Born charges) averaged over the global batch reproduce the
    # single-process gradient
    ase.io.write(tmp_path / "train.xyz", _frames(teacher, (2, 4, 6, 10), seed=0), format="extxyz")
    ase.io.write(tmp_path / "valid.xyz", _frames(teacher, (4, 6), seed=1), format="extxyz")
    torch.save(T.make_test_model(seed=0), tmp_path / "found.model")
    (tmp_path / "ddp").mkdir()
    (tmp_path / "one").mkdir()

    # two processes, 2 structures each: one optimiser step per epoch on all 4 structures
    env = dict(os.environ, OMP_NUM_THREADS="1", DUMP_DIR=str(tmp_path / "ddp"))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    argv = _args(tmp_path, "ddp", 2) + ["--distributed", "--launcher", "torchrun"]
    proc = subprocess.run(
        launcher + [os.path.abspath(__file__)] + argv,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    with open(tmp_path / "logs" / "ddp_run-3.log") as fh:  # {name}_run-{seed}
        log = fh.read()
    assert "gloo process group initialised for --device cpu (rank 0 of 2)" in log
    assert "DistributedDataParallel on CPU" in log

    # one process, all 4 structures in one batch
    with mock.patch.object(mace.tools, "train", _dumping(mace.tools.train, str(tmp_path / "one"))):
        cli.main(_args(tmp_path, "one", 4))

    def load(name):
        return torch.load(tmp_path / name, weights_only=True)

    initial, trained = load("ddp/initial_rank0.pt"), load("ddp/trained_rank0.pt")
    one = load("one/trained_rank0.pt")
    assert sorted(trained) == sorted(one) and any(k.startswith("blocks.les.") for k in trained)
    for key, value in load("one/initial_rank0.pt").items():  # both runs start alike
        assert torch.equal(value, initial[key]), key
    # the two ranks started and ended with the same parameters, bit for bit
    for tag in ("initial", "trained"):
        other = load(f"ddp/{tag}_rank1.pt")
        for key, value in load(f"ddp/{tag}_rank0.pt").items():
            assert torch.equal(value, other[key]), (tag, key)
    # every block parameter trained, and the two-process run equals the one-process run
    # on the global batch (Adam's second step depends on the sizes of both gradients)
    for key, value in trained.items():
        if key.startswith("blocks.les."):
            assert (value - initial[key]).abs().max() > 1e-4, key
        assert (value - one[key]).abs().max() < 1e-10, key

    # rank 0 wrote the final model in mace-lr's format; it matches the one-process model
    # ... and the TorchScript of its deployable form beside it (loads without mace-lr code)
    assert isinstance(torch.jit.load(str(tmp_path / "ddp_compiled.model")), torch.jit.ScriptModule)
    model, ref = mace_lr.load(tmp_path / "ddp.model"), mace_lr.load(tmp_path / "one.model")
    ref_params = dict(ref.named_parameters())
    for key, value in model.named_parameters():
        if key.startswith("blocks.les."):
            assert (value - initial[key]).abs().max() > 1e-4, key
        assert (value - ref_params[key]).abs().max() < 1e-10, key


if __name__ == "__main__":
    mace.tools.train = _dumping(mace.tools.train, os.environ["DUMP_DIR"])
    cli.main(sys.argv[1:])
