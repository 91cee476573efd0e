"""A block defined only here, with its own per-atom output and training target, is trained by
``mace_lr_run_train`` and reported by the calculator and ``mace_lr_eval_configs`` through
its declarations alone (no edit to mace_lr)."""

import ase.io
import numpy as np
import pytest
import torch
from ase import Atoms

import mace_lr
from mace_lr import testing as T
from mace_lr.cli import eval_configs
from mace_lr.cli import run_train as cli
from mace_lr.nn import scalar_feature_indices

#: reference site values of Na and Cl (a made-up per-atom property, e)
SITE = {11: 0.6, 17: -0.6}


class SiteValueBlock(mace_lr.LongRangeBlock):
    """Predicts a per-atom value from the base model's invariant features; no energy."""

    name = "site_values"
    outputs = (
        mace_lr.Output(
            "values",
            "atom",
            "e",
            "site_values",
            description="site values",
            target=mace_lr.Target(
                weight_flag="site_values_weight", key_flag="site_values_key", default_key="REF_site_values"
            ),
        ),
    )

    def __init__(self, feature_irreps, atomic_numbers, r_max, **config):
        super().__init__(feature_irreps, atomic_numbers, r_max, **config)
        scalars = scalar_feature_indices(feature_irreps)
        self.register_buffer("scalar_index", torch.tensor(scalars, dtype=torch.int64), persistent=False)
        self.readout = torch.nn.Linear(len(scalars), 1)

    def forward(self, ctx):
        values = self.readout(ctx["node_feats"][:, self.scalar_index]).squeeze(-1)
        energy = torch.zeros(ctx["ptr"].shape[0] - 1, dtype=values.dtype, device=values.device)
        return {"energy": energy, "values": values}


@pytest.fixture
def site_block():
    mace_lr.register_block("site_values", SiteValueBlock)
    yield SiteValueBlock
    from mace_lr.registry import unregister_block

    unregister_block("site_values")


#: mace's run_train configures the root logger; undo it after each test (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("restore_root_logger")


def _frames(teacher, n=12, seed=0):
    rng = np.random.default_rng(seed)
    frames = []
    while len(frames) < n:
        at = Atoms(numbers=[11, 17, 11, 17], positions=rng.normal(scale=1.8, size=(4, 3)))
        d = at.get_all_distances()
        np.fill_diagonal(d, 9.0)
        if d.min() < 2.0:
            continue
        out = T.evaluate(teacher, [at])
        at.info["REF_energy"] = float(out["energy"][0])
        at.arrays["REF_forces"] = out["forces"].numpy()
        at.arrays["REF_site_values"] = np.array([SITE[int(z)] for z in at.numbers]) + rng.normal(0, 0.01, 4)
        frames.append(at)
    return frames


def _argv(d, name, extra=()):
    return [
        "--name", name, "--foundation_model", str(d / "found.model"), "--lr_blocks", "site_values",
        "--train_file", str(d / "train.xyz"), "--valid_fraction", "0.25", "--energy_key", "REF_energy",
        "--forces_key", "REF_forces", "--max_num_epochs", "6", "--batch_size", "3", "--device", "cpu",
        "--default_dtype", "float64", "--E0s", "{11: -1.0, 17: -2.0}", "--seed", "1",
        "--model_dir", str(d), "--checkpoints_dir", str(d / "ckpt"), "--log_dir", str(d / "logs"),
        "--results_dir", str(d / "results"), "--lr", "0.01", "--pin_memory", "False", *extra,
    ]  # fmt: skip


def _site_rmse(calc, frames):
    errors = []
    for at in frames:
        at = at.copy()
        at.calc = calc
        at.get_potential_energy()
        errors.append(calc.results["site_values"] - at.arrays["REF_site_values"])
    return float(np.sqrt(np.mean(np.concatenate(errors) ** 2)))


def test_block_declared_in_a_test_trains_and_is_reported(site_block, tmp_path):
    teacher = T.make_test_model(seed=5)
    frames = _frames(teacher)
    ase.io.write(tmp_path / "train.xyz", frames, format="extxyz")
    torch.save(T.make_test_model(seed=0), tmp_path / "found.model")
    # the declaration brings its flags; a missing or misshapen reference fails at start
    with pytest.raises(SystemExit):
        cli.main(_argv(tmp_path, "bad", ["--site_values_weight", "1", "--site_values_key", "NOPE"]))

    torch.manual_seed(0)
    start = mace_lr.augment(torch.load(tmp_path / "found.model", weights_only=False), "site_values")
    rmse0 = _site_rmse(mace_lr.MACELRCalculator(start), frames)
    cli.main(_argv(tmp_path, "site", ["--site_values_weight", "100"]))
    model_path = tmp_path / "site.model"
    calc = mace_lr.MACELRCalculator(str(model_path))
    assert "site_values" in calc.implemented_properties
    rmse1 = _site_rmse(calc, frames)
    assert rmse1 < 0.5 * rmse0, (rmse0, rmse1)

    # mace_lr_eval_configs writes the declared per-atom output under its name
    eval_configs.main(
        [
            "--configs",
            str(tmp_path / "train.xyz"),
            "--model",
            str(model_path),
            "--output",
            str(tmp_path / "o.xyz"),
        ]
    )
    out = ase.io.read(tmp_path / "o.xyz", index=":")
    for at, ref in zip(out, frames):
        calc.calculate(ref.copy(), ["energy"], ["positions", "numbers", "cell", "pbc"])
        np.testing.assert_allclose(at.arrays["MACE_site_values"], calc.results["site_values"], atol=1e-8)


def test_lr_plugin_imports_a_module_that_registers_blocks(tmp_path, monkeypatch, capsys):
    (tmp_path / "my_site_plugin.py").write_text(
        "import mace_lr\nfrom test_declared_outputs import SiteValueBlock\n"
        "mace_lr.register_block('site_values', SiteValueBlock)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    from mace_lr.cli._options import import_plugin_modules
    from mace_lr.registry import unregister_block

    try:
        assert import_plugin_modules(["--x", "1", "--lr_plugin", "my_site_plugin"]) == ["my_site_plugin"]
        args = cli.build_parser().parse_args(
            ["--name", "x", "--lr_plugin", "my_site_plugin", "--site_values_weight", "2"]
        )
        assert args.site_values_weight == 2.0 and args.site_values_key == "REF_site_values"
    finally:
        unregister_block("site_values")
    with pytest.raises(SystemExit) as exc:
        cli.main(["--lr_plugin", "no_such_plugin_module_xyz", "--name", "x"])
    assert exc.value.code == 2
    assert "--lr_plugin 'no_such_plugin_module_xyz' cannot be imported" in capsys.readouterr().err
