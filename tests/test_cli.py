"""mace_lr_run_train / mace_lr_eval_configs: flags, preflight errors, short fine-tunes, response losses."""

import glob
import subprocess
import sys

import ase.io
import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk

import mace_lr
from mace_lr import testing as T
from mace_lr._data import atoms_to_batch
from mace_lr.cli import run_train as cli


@pytest.fixture(autouse=True)
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


def _frames(teacher, n=12, seed=0, numbers=(11, 17, 11, 17)):
    rng = np.random.default_rng(seed)
    frames = []
    while len(frames) < n:
        at = Atoms(numbers=list(numbers), positions=rng.normal(scale=1.8, size=(len(numbers), 3)))
        d = at.get_all_distances()
        np.fill_diagonal(d, 9.0)
        if d.min() < 2.0:
            continue
        out = T.evaluate(teacher, [at])
        at.info["REF_energy"] = float(out["energy"][0])
        at.arrays["REF_forces"] = out["forces"].numpy()
        at.info["charge"] = 0
        frames.append(at)
    return frames


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    teacher = T.perturb_blocks(mace_lr.augment(T.make_test_model(seed=5), "les"), scale=0.5)
    ase.io.write(d / "train.xyz", _frames(teacher), format="extxyz")
    torch.save(T.make_test_model(seed=0), d / "found.model")
    return d


def _args(workdir, name, epochs, extra=()):
    return [
        "--name",
        name,
        "--foundation_model",
        str(workdir / "found.model"),
        "--lr_blocks",
        "les",
        "--lr_config",
        '{"smearing": 1.1}',
        "--train_file",
        str(workdir / "train.xyz"),
        "--valid_fraction",
        "0.25",
        "--energy_key",
        "REF_energy",
        "--forces_key",
        "REF_forces",
        "--max_num_epochs",
        str(epochs),
        "--batch_size",
        "3",
        "--device",
        "cpu",
        "--default_dtype",
        "float64",
        "--E0s",
        "{11: -1.0, 17: -2.0}",
        "--seed",
        "1",
        "--model_dir",
        str(workdir),
        "--checkpoints_dir",
        str(workdir / "ckpt"),
        "--log_dir",
        str(workdir / "logs"),
        "--results_dir",
        str(workdir / "results"),
        "--lr",
        "0.01",
        "--pin_memory",
        "False",
        *extra,
    ]


def test_help_lists_new_flags():
    out = subprocess.run(
        [sys.executable, "-m", "mace_lr.cli.run_train", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for flag in (
        "--lr_blocks",
        "--lr_config",
        "--lr_charges_weight",
        "--foundation_model",
        "--dipole_weight",
    ):
        assert flag in out


def _fails_with(argv, capsys, text):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert text in capsys.readouterr().err


def test_unknown_block_fails_at_start(workdir, capsys):
    argv = _args(workdir, "bad", 1)
    argv[argv.index("les")] = "lse"
    _fails_with(argv, capsys, "Unknown long-range block 'lse'. Did you mean 'les'?")


def test_missing_data_key_fails_at_start(workdir, capsys):
    class NeedsCharge(mace_lr.LongRangeBlock):
        name = "needs_charge"
        required_inputs = ("total_charge",)

        def forward(self, ctx):
            return {"energy": torch.zeros(ctx["ptr"].numel() - 1, dtype=ctx["positions"].dtype)}

    mace_lr.register_block("needs_charge", NeedsCharge)
    try:
        argv = _args(workdir, "bad", 1)
        argv[argv.index("les")] = "needs_charge"
        _fails_with(argv, capsys, "lack the key 'total_charge'")
    finally:
        from mace_lr.registry import unregister_block

        unregister_block("needs_charge")
    _fails_with(_args(workdir, "bad", 1, ["--dipole_key", "REF_dipole"]), capsys, "lack the key 'REF_dipole'")
    _fails_with(_args(workdir, "bad", 1, ["--lr_charges_weight", "1.0"]), capsys, "latent charges")
    _fails_with(_args(workdir, "bad", 1, ["--lr_block_lr", "-0.01"]), capsys, "--lr_block_lr must be > 0")


def test_unknown_foundation_model_fails_at_start(workdir, capsys):
    argv = _args(workdir, "bad", 1)
    argv[argv.index(str(workdir / "found.model"))] = str(workdir / "no_such.model")
    _fails_with(argv, capsys, "is neither a model file nor a name mace resolves (")
    # names mace downloads or finds in its cache pass the check (mace resolves them itself)
    from mace_lr._mace_adapter import foundation_model_names

    assert {"small", "medium", "medium-mpa-0", "small_off"} <= set(foundation_model_names())


def test_foundation_elements_must_cover_data(workdir, capsys, tmp_path):
    frames = ase.io.read(workdir / "train.xyz", index=":")
    frames[0].numbers[0] = 8
    ase.io.write(tmp_path / "oxygen.xyz", frames, format="extxyz")
    argv = _args(workdir, "bad", 1)
    argv[argv.index(str(workdir / "train.xyz"))] = str(tmp_path / "oxygen.xyz")
    _fails_with(argv, capsys, "does not know element(s) O")


def _ckpt_state(workdir, name):
    paths = sorted(glob.glob(str(workdir / "ckpt" / f"{name}_run-1_epoch-*.pt")))
    return torch.load(paths[-1], map_location="cpu", weights_only=False)["model"], paths


def test_finetune_restart_and_reload(workdir):
    # straight run of 3 epochs
    cli.main(_args(workdir, "straight", 3))
    straight, _ = _ckpt_state(workdir, "straight")
    # 2 epochs, then a restart that continues to 3
    cli.main(_args(workdir, "resumed", 2))
    cli.main(_args(workdir, "resumed", 3, ["--restart_latest"]))
    resumed, paths = _ckpt_state(workdir, "resumed")
    # the restart trains epoch 2 only (upstream mace would re-train epoch 1 first) ...
    assert paths[-1].endswith("epoch-2.pt")
    with open(workdir / "logs" / "resumed_run-1.log") as fh:
        restart_log = fh.read().split("VERIFYING SETTINGS")[-1]
    assert "resuming after the completed epoch 1 of the checkpoint" in restart_log
    assert "Epoch 2:" in restart_log and "Epoch 1:" not in restart_log
    # ... with the same batches and gradient clipping, so it ends bit for bit where the
    # uninterrupted run ends (the test base has trainable Bessel weights outside mace's
    # optimiser groups; their stale, accumulating gradients used to shift the clipping)
    for key, value in straight.items():
        assert torch.equal(value, resumed[key]), key
    frames = ase.io.read(workdir / "train.xyz", index=":")
    m_straight = mace_lr.load(workdir / "straight.model")
    m_straight.load_state_dict(straight)
    model = mace_lr.load(workdir / "straight.model")
    # every parameter of the base trained too (mace's generator-valued groups are kept)
    found = torch.load(workdir / "found.model", weights_only=False)
    for name in ("node_embedding.linear.weight", "readouts.0.linear.weight", "products.0.linear.weight"):
        before = dict(found.named_parameters())[name]
        after = dict(model.base.named_parameters())[name]
        assert not torch.allclose(before.reshape(-1), after.reshape(-1)), name
    # the block trained: its coupling left zero and the readout moved
    assert abs(float(model.blocks["les"].coupling.detach())) > 1e-4
    assert model.blocks["les"].smearing == 1.1
    # the saved file reproduces the checkpoint's predictions exactly
    ref = m_straight  # the checkpoint's weights
    frames = frames[:3]
    a = T.evaluate(model, frames)
    b = T.evaluate(ref.eval(), frames)
    assert torch.equal(a["energy"], b["energy"]) and torch.equal(a["forces"], b["forces"])
    # the compiled file is the deployable model's TorchScript: it reproduces it
    scripted = torch.jit.load(str(workdir / "straight_compiled.model"))
    deployed = model.deployable()
    batch = atoms_to_batch(frames, model.atomic_numbers, float(model.r_max))
    with torch.jit.optimized_execution(False):
        got = scripted(dict(batch))
    want = deployed(dict(batch))
    for key in ("energy", "forces"):
        assert float((got[key] - want[key]).detach().abs().max()) <= 1e-10, key

    # a mace-lr model as the foundation: its block weights are carried over
    argv = _args(workdir, "second", 1)
    argv[argv.index(str(workdir / "found.model"))] = str(workdir / "straight.model")
    cli.main(argv)
    second = mace_lr.load(workdir / "second.model")
    assert (
        abs(float(second.blocks["les"].coupling.detach()) - float(model.blocks["les"].coupling.detach()))
        < 0.05
    )
    assert float(second.blocks["les"].coupling.detach()) != 0.0
    # and they keep training (every block parameter is in the optimiser)
    for (name, p1), (_, p2) in zip(
        model.blocks["les"].named_parameters(), second.blocks["les"].named_parameters()
    ):
        assert not torch.equal(p1, p2), name

    # eval_configs writes the long-range outputs
    from mace_lr.cli import eval_configs

    eval_configs.main(
        [
            "--configs",
            str(workdir / "train.xyz"),
            "--model",
            str(workdir / "straight.model"),
            "--output",
            str(workdir / "out.xyz"),
            "--compute_bec",
        ]
    )
    out = ase.io.read(workdir / "out.xyz", index=":")
    assert len(out) == len(ase.io.read(workdir / "train.xyz", index=":"))
    assert "MACE_charges" in out[0].arrays and "MACE_lr_energy" in out[0].info
    assert out[0].arrays["MACE_born_effective_charges"].shape == (4, 9)
    assert abs(out[0].info["MACE_energy"] - float(a["energy"][0])) < 1e-8


# ---------------------------------------------------------------- field-response targets
def _field_frames(teacher, n=12, seed=0):
    """Open NaCl clusters in random fields, labelled by ``teacher`` (U, F, μ, Z, α)."""
    rng = np.random.default_rng(seed)
    frames = []
    while len(frames) < n:
        at = Atoms(numbers=[11, 17, 11, 17], positions=rng.normal(scale=1.8, size=(4, 3)))
        d = at.get_all_distances()
        np.fill_diagonal(d, 9.0)
        if d.min() < 2.0:
            continue
        field = rng.normal(size=3)
        at.info["external_field"] = 0.3 * field / np.linalg.norm(field)
        out = T.evaluate(teacher, [at], compute_born_charges=True, compute_polarizability=True)
        at.info["REF_energy"] = float(out["energy"][0])
        at.arrays["REF_forces"] = out["forces"].numpy()
        at.info["REF_dipole"] = out["dipole"][0].numpy()
        at.arrays["REF_born_charges"] = out["born_effective_charges"].numpy().reshape(4, 9)
        at.info["REF_polarizability"] = out["polarizability"][0].numpy().reshape(9)
        frames.append(at)
    return frames


@pytest.fixture(scope="module")
def fieldwork(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_field")
    # the same teacher whatever ran before: fixed seed and default dtype for the block's initial weights
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        teacher = T.perturb_blocks(mace_lr.augment(T.make_test_model(seed=0), "field"), scale=0.5)
    finally:
        torch.set_default_dtype(previous)
    ase.io.write(d / "train.xyz", _field_frames(teacher), format="extxyz")
    torch.save(T.make_test_model(seed=0), d / "found.model")
    return d, teacher


def _field_args(d, name, epochs, extra=()):
    argv = _args(d, name, epochs, extra)
    argv[argv.index("les")] = "field"
    argv[argv.index('{"smearing": 1.1}')] = '{"num_vectors": 4}'
    return argv


def test_help_lists_response_flags():
    text = cli.build_parser().format_help()
    for flag in (
        "--external_field_key",
        "--born_charges_key",
        "--born_charges_weight",
        "--polarization_key",
        "--polarization_weight",
        "--polarizability_key",
        "--polarizability_weight",
        "--wannier_centroids_key",
        "--wannier_centroids_weight",
    ):
        assert flag in text


def test_response_targets_are_checked_at_start(fieldwork, capsys, tmp_path):
    d, _ = fieldwork
    frames = ase.io.read(d / "train.xyz", index=":")
    _fails_with(
        _field_args(d, "bad", 1, ["--born_charges_key", "Z_missing", "--born_charges_weight", "1"]),
        capsys,
        "lack the key 'Z_missing'",
    )
    for atoms in frames:
        atoms.arrays["Z3"] = atoms.arrays["REF_born_charges"][:, :3]
        atoms.info["bad_field"] = np.ones(2)
    ase.io.write(tmp_path / "bad.xyz", frames, format="extxyz")
    argv = _field_args(d, "bad", 1, ["--born_charges_key", "Z3", "--born_charges_weight", "1"])
    argv[argv.index(str(d / "train.xyz"))] = str(tmp_path / "bad.xyz")
    _fails_with(argv, capsys, "must hold 9 values per atom")
    argv = _field_args(d, "bad", 1, ["--external_field_key", "bad_field"])
    argv[argv.index(str(d / "train.xyz"))] = str(tmp_path / "bad.xyz")
    _fails_with(argv, capsys, "must be a 3-vector in V/Å")
    # molecules have no polarization: the dipole is their target
    _fails_with(
        _field_args(d, "bad", 1, ["--polarization_key", "REF_dipole", "--polarization_weight", "1"]),
        capsys,
        "is not periodic, so it has no polarization",
    )


def test_data_pipeline_carries_field_and_born_charges(fieldwork):
    """Inside a run, mace's own data loading puts E and Z of every structure in the batch."""
    from mace import data as mace_data
    from mace.cli import run_train as rt
    from mace.tools import AtomicNumberTable, torch_geometric

    d, _ = fieldwork
    frames = ase.io.read(d / "train.xyz", index=":")
    args = cli.build_parser().parse_args(_field_args(d, "x", 1))
    weights = {"born_charges": 1.0, "polarization": 1.0}
    keys = {"external_field": "external_field", "born_charges": "REF_born_charges", "polarization": "P"}
    for atoms in frames:
        atoms.info["P"] = np.arange(3.0) * 0.01 + len(atoms)
    with cli._hooks({}, None, weights, keys, seed=1):
        keyspec = rt.update_keyspec_from_kwargs(mace_data.KeySpecification(), vars(args))
        configs = [mace_data.config_from_atoms(a, key_specification=keyspec) for a in frames]
        graphs = [
            mace_data.AtomicData.from_config(c, z_table=AtomicNumberTable([11, 17]), cutoff=4.0)
            for c in configs
        ]
    batch = next(iter(torch_geometric.dataloader.DataLoader(graphs, batch_size=len(graphs))))
    field = np.array([a.info["external_field"] for a in frames])
    z = np.concatenate([a.arrays["REF_born_charges"] for a in frames]).reshape(-1, 3, 3)
    assert np.allclose(batch["external_field"].numpy(), field, atol=1e-12)
    assert batch["born_charges"].shape == (len(z), 3, 3)
    assert np.allclose(batch["born_charges"].numpy(), z, atol=1e-12)
    assert np.allclose(batch["polarization"].numpy(), [a.info["P"] for a in frames], atol=1e-12)
    # outside a run mace's key specification is untouched
    plain = rt.update_keyspec_from_kwargs(mace_data.KeySpecification(), vars(args))
    assert "born_charges" not in plain.arrays_keys and "external_field" not in plain.info_keys


def _z_alpha_errors(model, frames):
    out = T.evaluate(model.eval(), frames, compute_born_charges=True, compute_polarizability=True)
    z_ref = np.concatenate([a.arrays["REF_born_charges"] for a in frames]).reshape(-1, 3, 3)
    a_ref = np.array([a.info["REF_polarizability"].reshape(3, 3) for a in frames])
    z_err = np.sqrt(np.mean((out["born_effective_charges"].numpy() - z_ref) ** 2))
    a_err = np.sqrt(np.mean((out["polarizability"].numpy() - a_ref) ** 2))
    return z_err, a_err


def test_finetune_on_born_charges_and_polarizability(fieldwork):
    """A field block fine-tuned on Z and α through the CLI moves towards the teacher's Z and α."""
    d, _ = fieldwork
    frames = ase.io.read(d / "train.xyz", index=":")
    extra = [
        "--born_charges_weight", "100", "--polarizability_key", "REF_polarizability",
        "--polarizability_weight", "1000", "--dipole_key", "REF_dipole", "--dipole_weight", "10",
        "--energy_weight", "0.01", "--forces_weight", "0.01",
    ]  # fmt: skip
    start = mace_lr.augment(torch.load(d / "found.model", weights_only=False), {"field": {"num_vectors": 4}})
    z0, a0 = _z_alpha_errors(start, frames)
    assert z0 > 0.05 and a0 > 1e-3  # the teacher's response is far from zero
    cli.main(_field_args(d, "resp", 10, extra))
    model = mace_lr.load(d / "resp.model")
    assert model.training_responses == ()  # plain MD with the saved model pays nothing
    z1, a1 = _z_alpha_errors(model, frames)
    assert z1 < 0.5 * z0, (z0, z1)
    assert a1 < 0.5 * a0, (a0, a1)

    # eval_configs evaluates each structure in its own field and writes Z and α
    from mace_lr.cli import eval_configs

    eval_configs.main(
        ["--configs", str(d / "train.xyz"), "--model", str(d / "resp.model"), "--output",
         str(d / "resp_out.xyz"), "--compute_bec", "--compute_polarizability"]
    )  # fmt: skip
    out = ase.io.read(d / "resp_out.xyz", index=":")
    direct = T.evaluate(model, frames[:2], compute_born_charges=True, compute_polarizability=True)
    # extxyz stores 8 decimals
    assert np.allclose(
        out[1].info["MACE_polarizability"], direct["polarizability"][1].numpy().ravel(), atol=1e-7
    )
    assert np.allclose(
        out[0].arrays["MACE_born_effective_charges"],
        direct["born_effective_charges"][:4].numpy().reshape(4, 9),
        atol=1e-7,
    )
    # in its own field: a different field gives a different α (order-3 block)
    zero = [a.copy() for a in frames]
    for a in zero:
        a.info["external_field"] = np.zeros(3)
    at_zero = T.evaluate(model, zero, compute_polarizability=True)["polarizability"].numpy().reshape(-1, 9)
    written = np.array([a.info["MACE_polarizability"] for a in out])
    assert np.abs(at_zero - written).max() > 1e-4


def _periodic_batch(structures):
    return {
        "cell": torch.tensor(np.concatenate([np.asarray(a.cell) for a in structures])),
        "pbc": torch.tensor(np.array([a.pbc for a in structures])),
    }


def test_polarization_loss_is_blind_to_branch_and_sees_errors():
    class Zero(torch.nn.Module):
        def forward(self, ref, pred):
            return torch.zeros((), dtype=torch.float64)

    cells = [bulk("NaCl", "rocksalt", a=5.6), bulk("Cu", "fcc", a=3.6, cubic=True) * (2, 1, 1)]
    volumes = torch.tensor([a.get_volume() for a in cells])
    loss_fn = cli.LongRangeLoss(Zero(), polarization_weight=2.0)
    p_ref = torch.tensor([[0.01, -0.02, 0.005], [0.0, 0.03, -0.01]], dtype=torch.float64)
    p_pred = p_ref + torch.tensor([[0.002, 0.0, -0.001], [0.001, 0.001, 0.0]], dtype=torch.float64)
    batch = {**_periodic_batch(cells), "polarization": p_ref}
    pred = {"dipole": p_pred * volumes[:, None]}
    value = float(loss_fn(batch, pred))
    assert abs(value - 2.0 * float(((p_pred - p_ref) ** 2).sum(-1).mean())) < 1e-15
    # the reference on another branch: P + e·(n_k a_k)/Ω
    shifted = p_ref.clone()
    shifted[0] += torch.tensor(cells[0].cell[1] - 3 * cells[0].cell[2]) / volumes[0]
    shifted[1] += torch.tensor(cells[1].cell[0]) / volumes[1]
    assert abs(float(loss_fn({**batch, "polarization": shifted}, pred)) - value) < 1e-12
    assert float(((p_pred - shifted) ** 2).sum(-1).mean()) > 100 * value  # a plain loss would not be


# ---------------------------------------------------------------- mace's fine-tuning modes
def _max_change(before: torch.nn.Module, after: torch.nn.Module, prefix: str) -> float:
    a = dict(before.named_parameters())
    changes = [
        float((a[name] - p).detach().abs().max())
        for name, p in after.named_parameters()
        if name.startswith(prefix)
    ]
    return max(changes)


def test_freeze_trains_the_block_and_keeps_the_base(workdir):
    cli.main(_args(workdir, "frozen", 2, ["--freeze", "7"]))
    model = mace_lr.load(workdir / "frozen.model")
    found = torch.load(workdir / "found.model", weights_only=False)
    for prefix in ("node_embedding", "interactions", "products", "readouts"):
        assert _max_change(found, model.base, prefix) == 0.0, prefix
    assert abs(float(model.blocks["les"].coupling.detach())) > 1e-4  # the new block trained in full


def test_lora_adapts_the_base_at_low_rank_and_trains_the_block(workdir):
    cli.main(_args(workdir, "lora", 2, ["--lora", "True", "--lora_rank", "2"]))
    model = mace_lr.load(workdir / "lora.model")  # LoRA merged, saved in the safe format
    found = torch.load(workdir / "found.model", weights_only=False)
    # upstream LoRA on the whole model would freeze the LES coupling at zero
    assert abs(float(model.blocks["les"].coupling.detach())) > 1e-4
    fresh = mace_lr.augment(found, {"les": {"smearing": 1.1}})
    assert _max_change(fresh.blocks["les"], model.blocks["les"], "readout") > 1e-4
    # a dense layer of the base moved by a rank-2 update
    name = "interactions.0.conv_tp_weights.layer0.weight"
    delta = dict(model.base.named_parameters())[name] - dict(found.named_parameters())[name]
    sv = torch.linalg.svdvals(delta.detach())
    assert float(sv[0]) > 1e-5 and float(sv[2]) < 1e-9 * float(sv[0]), sv
    frames = ase.io.read(workdir / "train.xyz", index=":")[:2]
    assert not torch.allclose(T.evaluate(model, frames)["energy"], T.evaluate(fresh, frames)["energy"])


def test_stage_two_model_is_a_mace_lr_model(workdir):
    cli.main(_args(workdir, "swa", 3, ["--stage_two", "--start_stage_two", "2"]))
    with open(workdir / "logs" / "swa_run-1.log") as fh:
        assert "Stage Two" in fh.read()
    two = mace_lr.load(workdir / "swa_stagetwo.model")
    one = mace_lr.load(workdir / "swa.model")
    frames = ase.io.read(workdir / "train.xyz", index=":")[:3]
    assert not torch.equal(T.evaluate(two, frames)["energy"], T.evaluate(one, frames)["energy"])


def test_multihead_finetuning_with_replay_data(workdir, tmp_path):
    """mace's multi-head fine-tuning (pt_head replay) through mace_lr_run_train."""
    frames = ase.io.read(workdir / "train.xyz", index=":")
    ase.io.write(tmp_path / "replay.xyz", frames[:6], format="extxyz")
    argv = _args(
        workdir, "mh", 2, ["--multiheads_finetuning", "True", "--pt_train_file", str(tmp_path / "replay.xyz")]
    )
    cli.main(argv)
    model = mace_lr.load(workdir / "mh.model")
    assert sorted(model.heads) == ["Default", "pt_head"], model.heads
    assert abs(float(model.blocks["les"].coupling.detach())) > 1e-4
    calc = mace_lr.MACELRCalculator(
        model_paths=str(workdir / "mh.model"), device="cpu", default_dtype="float64"
    )
    energies = {}
    for head in ("Default", "pt_head"):
        atoms = frames[0].copy()
        atoms.info["head"] = head
        atoms.calc = calc
        energies[head] = (atoms.get_potential_energy(), calc.results["lr_energy"])
    # the heads' base energies differ; the long-range block is shared by both
    assert energies["Default"][0] != energies["pt_head"][0]
    assert abs(energies["Default"][1] - energies["pt_head"][1]) < 1e-12


# ---------------------------------------------------------------- Wannier centroids, QEq charges
WANNIER = {"centroid_electrons": {"Cl": 8}}


@pytest.fixture(scope="module")
def wannierwork(tmp_path_factory):
    """NaCl clusters labelled by a Wannier teacher: E, F, μ and Cl centroids (NaN on Na rows)."""
    d = tmp_path_factory.mktemp("cli_wannier")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        teacher = T.perturb_blocks(
            mace_lr.augment(T.make_test_model(seed=5), {"wannier": WANNIER}), scale=0.5
        )
    finally:
        torch.set_default_dtype(previous)
    frames = _frames(teacher, n=12, seed=3)
    for at in frames:
        out = T.evaluate(teacher, [at])
        w = out["wannier_centroids"].numpy().copy()
        w[~out["wannier_centroid_mask"].numpy()] = np.nan
        at.arrays["REF_wannier_centroids"] = w
        at.info["REF_dipole"] = out["dipole"][0].numpy()
    ase.io.write(d / "train.xyz", frames, format="extxyz")
    torch.save(T.make_test_model(seed=0), d / "found.model")
    return d


def _wannier_args(d, name, epochs, extra=()):
    argv = _args(d, name, epochs, extra)
    argv[argv.index("les")] = "wannier"
    argv[argv.index('{"smearing": 1.1}')] = '{"centroid_electrons": {"Cl": 8}}'
    return argv


def _centroid_rmse(model, frames):
    err = []
    for at in frames:
        out = T.evaluate(model, [at])
        mask = out["wannier_centroid_mask"].numpy()
        err.append(out["wannier_centroids"].numpy()[mask] - at.arrays["REF_wannier_centroids"][mask])
    return float(np.sqrt(np.mean(np.concatenate(err) ** 2)))


def test_wannier_targets_are_checked_at_start(wannierwork, capsys, tmp_path):
    d = wannierwork
    # a loss on centroids needs a block that predicts them
    _fails_with(_args(d, "bad", 1, ["--wannier_centroids_weight", "1"]), capsys, "predicts Wannier centroids")
    # block options are checked before mace loads anything
    argv = _wannier_args(d, "bad", 1)
    argv[argv.index('{"centroid_electrons": {"Cl": 8}}')] = "{}"
    _fails_with(argv, capsys, "block 'wannier': the wannier block needs `centroid_electrons`")
    # the key must exist and have one row per atom
    argv = _wannier_args(d, "bad", 1, ["--wannier_centroids_key", "W", "--wannier_centroids_weight", "1"])
    _fails_with(argv, capsys, "lack the key 'W'")
    frames = ase.io.read(d / "train.xyz", index=":")
    for at in frames:
        at.arrays["W1"] = at.arrays["REF_wannier_centroids"][:, :1]
    ase.io.write(tmp_path / "w1.xyz", frames, format="extxyz")
    argv = _wannier_args(d, "bad", 1, ["--wannier_centroids_key", "W1", "--wannier_centroids_weight", "1"])
    argv[argv.index(str(d / "train.xyz"))] = str(tmp_path / "w1.xyz")
    _fails_with(argv, capsys, "must have shape [n_atoms, 3]")


def test_finetune_on_wannier_centroids(wannierwork):
    """The wannier block fine-tuned on the teacher's centroids moves its centroids onto them;
    NaN rows (Na, no centroid) are read and ignored."""
    d = wannierwork
    frames = ase.io.read(d / "train.xyz", index=":")
    assert np.isnan(frames[0].arrays["REF_wannier_centroids"][frames[0].numbers == 11]).all()
    start = mace_lr.augment(torch.load(d / "found.model", weights_only=False), {"wannier": WANNIER})
    e0 = _centroid_rmse(start, frames)
    assert e0 > 0.05  # the teacher's centroids sit well off the atoms
    extra = ["--wannier_centroids_weight", "100", "--energy_weight", "0.01", "--forces_weight", "0.01"]
    cli.main(_wannier_args(d, "wc", 8, extra))
    model = mace_lr.load(d / "wc.model")
    e1 = _centroid_rmse(model, frames)
    assert e1 < 0.5 * e0, (e0, e1)
    from mace_lr.cli import eval_configs

    eval_configs.main(
        ["--configs", str(d / "train.xyz"), "--model", str(d / "wc.model"), "--output", str(d / "o.xyz")]
    )
    out = ase.io.read(d / "o.xyz", index=":")
    na = out[0].numbers == 11
    assert np.isnan(out[0].arrays["MACE_wannier_centroids"][na]).all()
    direct = T.evaluate(model, frames[:1])["wannier_centroids"].numpy()
    assert np.allclose(out[0].arrays["MACE_wannier_centroids"][~na], direct[~na], atol=1e-7)


def test_centroid_loss_is_blind_to_lattice_images():
    """A reference centroid stored in another periodic image costs nothing; a real error does."""
    cell = torch.tensor(bulk("NaCl", "rocksalt", a=5.64).cell[:])  # triclinic primitive cell
    pred = torch.tensor([[0.1, -0.2, 0.05], [1.0, 1.0, 1.0]], dtype=torch.float64)
    ref = pred + torch.stack([cell[0] - 2 * cell[2], cell[1]])
    loss = cli.LongRangeLoss(lambda ref, pred: torch.zeros(()), wannier_centroids_weight=1.0)
    batch = {
        "cell": cell.repeat(2, 1),
        "pbc": torch.ones(2, 3, dtype=torch.bool),
        "batch": torch.tensor([0, 1]),
        "wannier_centroids": ref,
        "wannier_centroids_present": torch.ones(2, dtype=torch.float64),
    }
    pred_out = {"wannier_centroids": pred, "wannier_centroid_mask": torch.tensor([True, True])}
    assert float(loss(batch, pred_out)) < 1e-24
    pred_out["wannier_centroids"] = pred + torch.tensor(
        [[0.1, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64
    )
    assert abs(float(loss(batch, pred_out)) - 0.01 / 6) < 1e-12
    # molecules (zero cell, no pbc) are compared as they are
    batch["cell"] = torch.zeros(6, 3, dtype=torch.float64)
    batch["pbc"] = torch.zeros(2, 3, dtype=torch.bool)
    assert float(loss(batch, pred_out)) > 1.0


def test_finetune_qeq_on_reference_charges(workdir, tmp_path):
    """--lr_charges_weight fits QEq charges (partial charges, as in 4G-HDNNPs) to REF_charges."""
    torch.manual_seed(0)
    teacher = T.perturb_blocks(mace_lr.augment(T.make_test_model(seed=5), "qeq"), scale=0.3)
    frames = ase.io.read(workdir / "train.xyz", index=":")
    for at in frames:
        at.arrays["REF_charges"] = T.evaluate(teacher, [at])["charges"].numpy()
    ase.io.write(tmp_path / "q.xyz", frames, format="extxyz")

    def charge_rmse(model):
        got = np.concatenate([T.evaluate(model, [at])["charges"].numpy() for at in frames])
        ref = np.concatenate([at.arrays["REF_charges"] for at in frames])
        return float(np.sqrt(np.mean((got - ref) ** 2)))

    start = mace_lr.augment(torch.load(workdir / "found.model", weights_only=False), "qeq")
    q0 = charge_rmse(start)
    assert q0 > 0.02
    argv = _args(workdir, "qeq_q", 6, ["--lr_charges_weight", "100", "--total_charge_key", "charge"])
    argv[argv.index("les")] = "qeq"
    argv[argv.index('{"smearing": 1.1}')] = "{}"
    argv[argv.index(str(workdir / "train.xyz"))] = str(tmp_path / "q.xyz")
    cli.main(argv)
    q1 = charge_rmse(mace_lr.load(workdir / "qeq_q.model"))
    assert q1 < 0.5 * q0, (q0, q1)


def test_lr_config_flat_or_per_block(tmp_path):
    flat = cli.parse_block_config("wannier", '{"centroid_electrons": {"O": 8}, "smearing": 1.2}')
    assert flat == {"wannier": {"centroid_electrons": {"O": 8}, "smearing": 1.2}}
    (tmp_path / "lr.yaml").write_text("les:\n  smearing: 1.5\nwannier:\n  centroid_electrons: {O: 8}\n")
    nested = cli.parse_block_config("les, wannier", str(tmp_path / "lr.yaml"))
    assert nested == {"les": {"smearing": 1.5}, "wannier": {"centroid_electrons": {"O": 8}}}
    with pytest.raises(ValueError, match=r"options for block\(s\) \['qeq'\] not listed"):
        cli.parse_block_config("les,wannier", '{"les": {}, "qeq": {}}')


def test_config_yaml_carries_mace_lr_flags(workdir, tmp_path):
    """mace's --config YAML sets the mace-lr flags too, and switches their loss terms on."""
    (tmp_path / "run.yaml").write_text(
        'lr_blocks: wannier\nlr_config: \'{"centroid_electrons": {"Cl": 8}}\'\n'
        "dipole_weight: 2.5\nwannier_centroids_weight: 7.0\n"
    )
    argv = [
        a
        for a in _args(workdir, "cfg", 1)
        if a not in ("--lr_blocks", "les", "--lr_config", '{"smearing": 1.1}')
    ]
    argv += ["--config", str(tmp_path / "run.yaml")]
    args = cli.build_parser().parse_args(argv)
    assert cli.parse_block_config(args.lr_blocks, args.lr_config) == {
        "wannier": {"centroid_electrons": {"Cl": 8}}
    }
    weights = cli.loss_weights(args, argv)
    assert weights["dipole"] == 2.5 and weights["wannier_centroids"] == 7.0
    assert cli.loss_weights(cli.build_parser().parse_args(argv[:-2]), argv[:-2])["dipole"] == 0.0


def test_group_batch_sampler_keeps_groups_whole_and_reshuffles():
    """``--lr_batch_groups``: every batch holds whole groups; the order follows the generator."""
    from mace_lr.cli._lr_hooks import GroupBatchSampler, group_id

    labels = [group_id(v) for v in [3, 3, 1, 1, 7, 7, 3, 1, "a", "a"]] + [-1, -1]
    gen = torch.Generator().manual_seed(0)
    sampler = GroupBatchSampler(labels, batch_size=4, generator=gen)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    assert sorted(i for b in batches for i in b) == list(range(12))
    for b in batches:
        groups = {labels[i] for i in b if labels[i] >= 0}
        for g in groups:  # a group is never split across batches
            assert {i for i in range(12) if labels[i] == g} <= set(b)
        assert len(b) <= 4 or len(groups) == 1
    orders = set()
    for seed in range(6):
        gen.manual_seed(seed)
        orders.add(tuple(tuple(b) for b in sampler))
    assert len(orders) > 1
    gen.manual_seed(0)
    assert [list(b) for b in sampler] == batches  # the same seed gives the same epoch


def test_group_batches_through_mace_data_pipeline():
    """The hooks label mace's AtomicData with atoms.info['quartet'] and the training loader
    yields whole quartets; a loader that does not shuffle is mace's own."""
    from pathlib import Path

    from mace import data as mace_data
    from mace.data import atomic_data
    from mace.tools import torch_geometric
    from mace.tools.utils import AtomicNumberTable

    from mace_lr.cli import _lr_hooks as hooks
    from mace_lr.cli._mace_patches import RunContext

    frames = ase.io.read(Path(__file__).resolve().parents[1] / "data" / "nonlocal_valid.xyz", ":16")
    run = RunContext(
        specs={}, carried=None, weights={}, keys={"external_field": "f"}, seed=1, batch_groups="quartet"
    )
    update = hooks.keyspec_hook(mace_data.update_keyspec_from_kwargs, run)
    from_config = hooks.target_shapes_hook(atomic_data.AtomicData.from_config, run).__get__(
        None, atomic_data.AtomicData
    )
    keyspec = update(mace_data.KeySpecification(), {"energy_key": "REF_energy"})
    table = AtomicNumberTable(sorted({int(z) for a in frames for z in a.numbers}))
    dataset = [
        from_config(mace_data.config_from_atoms(a, key_specification=keyspec), z_table=table, cutoff=4.5)
        for a in frames
    ]
    loader_cls = hooks.group_batches_hook(torch_geometric.dataloader.DataLoader, run)
    loader = loader_cls(
        dataset=dataset, batch_size=8, shuffle=True, drop_last=True, generator=torch.Generator()
    )
    quartets = [a.info["quartet"] for a in frames]
    seen = []
    for batch in loader:
        labels = batch.lr_batch_group.tolist()
        assert len(labels) == 8 and all(labels.count(q) == 4 for q in set(labels))
        seen += labels
    assert sorted(seen) == sorted(quartets)
    plain = loader_cls(dataset=dataset, batch_size=5, shuffle=False)
    assert [b.num_graphs for b in plain] == [5, 5, 5, 1]


def test_block_learning_rate_option():
    """``--lr_block_lr`` sets the blocks' optimiser groups; the base keeps ``--lr``."""
    from mace.tools.scripts_utils import get_params_options

    from mace_lr.cli._lr_hooks import block_params_hook
    from mace_lr.cli._options import build_parser

    model = mace_lr.augment(T.make_test_model(), "les")
    hook = block_params_hook(get_params_options, None)
    for argv, block_lr in (([], 0.001), (["--lr_block_lr", "0.02"], 0.02)):
        args = build_parser().parse_args(["--name", "x", "--lr", "0.001", *argv])
        groups = hook(args, model)["params"]
        blocks = [g for g in groups if g["name"] == "lr_les"]
        assert len(blocks) == 1 and blocks[0]["lr"] == block_lr
        assert all(g["lr"] == 0.001 for g in groups if g["name"] != "lr_les")
        ids = {id(p) for g in blocks for p in g["params"]}
        assert ids == {id(p) for p in model.blocks["les"].parameters()}
