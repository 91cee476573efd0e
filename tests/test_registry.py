"""Tests of mace_lr.registry (needs tests/fixture_plugin installed, see its README)."""

from __future__ import annotations

import importlib.metadata as md
import json
import logging
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mace_lr import registry
from mace_lr._block import LongRangeBlock
from mace_lr.registry import (
    BlockNameClashError,
    BlockRegistryError,
    BrokenBlockPluginError,
    NotABlockError,
    UnknownBlockError,
    available_blocks,
    block_origin,
    get_block,
    register_block,
    unregister_block,
)

FIXTURE_DIST = "mace-lr-fixture-plugin"
MAIN_DIST = "mace-lr"


def _require_fixture_plugin() -> None:
    try:
        md.distribution(FIXTURE_DIST)
    except md.PackageNotFoundError:  # pragma: no cover - environment problem
        pytest.fail(
            f"{FIXTURE_DIST} is not installed: run "
            "`python -m pip install --no-deps --no-build-isolation -e tests/fixture_plugin`"
        )


@pytest.fixture(autouse=True)
def _isolated_runtime_registry():
    """Restore the runtime registrations after each test."""
    _require_fixture_plugin()
    saved = dict(registry._RUNTIME)
    yield
    registry._RUNTIME.clear()
    registry._RUNTIME.update(saved)


def _make_dist(root: Path, name: str, version: str, blocks: dict) -> md.PathDistribution:
    """Write a minimal ``*.dist-info`` declaring ``blocks`` and return its distribution."""
    info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n", encoding="utf-8"
    )
    lines = "".join(f"{key} = {value}\n" for key, value in blocks.items())
    (info / "entry_points.txt").write_text(f"[mace_lr.blocks]\n{lines}", encoding="utf-8")
    return md.PathDistribution(info)


def _eps(dist: md.PathDistribution) -> list:
    eps = [ep for ep in dist.entry_points if ep.group == registry.ENTRY_POINT_GROUP]
    assert eps and all(ep.dist is not None for ep in eps)
    return eps


def _dummy_block(block_name: str) -> type:
    return type(
        f"Dummy_{block_name}",
        (LongRangeBlock,),
        {"name": block_name, "__module__": __name__},
    )


# --------------------------------------------------------------------------- listing


def test_listing_contains_builtin_and_fixture_sorted_and_stable():
    names = available_blocks()
    assert "les" in names
    assert "fixture_constant" in names
    assert "fixture_broken" in names  # listed even though loading it fails
    assert "fixture_not_a_block" in names
    assert names == sorted(names)
    assert len(names) == len(set(names))
    assert available_blocks() == names
    assert available_blocks() == names


def test_listing_order_does_not_depend_on_entry_point_order(monkeypatch, tmp_path):
    dist = _make_dist(tmp_path, "order-dist", "1.0", {"zeta": "m:Z", "alpha": "m:A", "mid": "m:M"})
    eps = _eps(dist)
    monkeypatch.setattr(registry, "_iter_entry_points", lambda: list(eps))
    forward = available_blocks()
    monkeypatch.setattr(registry, "_iter_entry_points", lambda: list(reversed(eps)))
    assert available_blocks() == forward == ["alpha", "mid", "zeta"]


def test_listing_includes_runtime_blocks():
    register_block("zz_runtime_listed", _dummy_block("zz_runtime_listed"))
    names = available_blocks()
    assert "zz_runtime_listed" in names
    assert names == sorted(names)


def test_listing_does_not_import_block_modules():
    code = textwrap.dedent(
        """
        import json, sys
        from mace_lr.registry import available_blocks, block_origin, get_block
        names = available_blocks()
        block_origin("fixture_constant")
        block_origin("les")
        def loaded():
            return sorted(
                m for m in sys.modules
                if m == "mace_lr_fixture_plugin" or m.startswith("mace_lr_fixture_plugin.")
                or m.startswith("mace_lr.plugins.")
            )
        before = loaded()
        get_block("fixture_constant")
        after = loaded()
        sys.stdout.write(json.dumps({"names": names, "before": before, "after": after}))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert "fixture_constant" in result["names"] and "les" in result["names"]
    assert result["before"] == [], result
    # sanity check that the probe can see an import at all
    assert "mace_lr_fixture_plugin" in result["after"]


# --------------------------------------------------------------------------- get_block


def test_get_block_returns_fixture_class_and_caches_it():
    import mace_lr_fixture_plugin

    cls = get_block("fixture_constant")
    assert cls is mace_lr_fixture_plugin.ConstantBlock
    assert issubclass(cls, LongRangeBlock)
    assert cls.name == "fixture_constant"
    assert get_block("fixture_constant") is cls


def test_fixture_constant_block_forward_is_zero_and_learnable():
    cls = get_block("fixture_constant")
    block = cls(feature_irreps="8x0e", atomic_numbers=[1, 8], r_max=5.0)
    positions = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    ctx = {"positions": positions, "ptr": torch.tensor([0, 2, 5])}
    out = block(ctx)
    assert out["energy"].shape == (2,)
    assert out["energy"].dtype == torch.float64
    assert torch.equal(out["energy"], torch.zeros(2, dtype=torch.float64))
    names = [n for n, _ in block.named_parameters()]
    assert names == ["scale"]
    assert block.scale.item() == 0.0
    out["energy"].sum().backward()
    assert block.scale.grad is not None
    rebuilt = cls.from_config(block.to_config())
    assert rebuilt.to_config() == block.to_config()


def test_unknown_name_error_lists_blocks_and_suggests_close_match():
    pattern = r"Unknown long-range block 'fixture_constnt'\."
    with pytest.raises(UnknownBlockError, match=pattern) as e:
        get_block("fixture_constnt")
    msg = str(e.value)
    assert "Did you mean 'fixture_constant'" in msg
    assert "Available blocks: " in msg
    for name in available_blocks():
        assert repr(name) in msg
    assert isinstance(e.value, KeyError)
    assert isinstance(e.value, BlockRegistryError)
    # str() is the plain message, not KeyError's quoted repr
    assert msg.startswith("Unknown long-range block")


def test_unknown_name_without_close_match_has_no_suggestion():
    with pytest.raises(KeyError, match=r"Unknown long-range block 'qqqqqqqq'\. Available") as e:
        get_block("qqqqqqqq")
    assert "Did you mean" not in str(e.value)


def test_broken_plugin_error_names_block_distribution_and_target():
    pattern = (
        r"Block 'fixture_broken' from distribution 'mace-lr-fixture-plugin' 0\.0\.1 could not "
        r"be loaded: entry point fixture_broken = 'mace_lr_fixture_plugin\.broken:Block'"
    )
    with pytest.raises(BrokenBlockPluginError, match=pattern) as e:
        get_block("fixture_broken")
    assert isinstance(e.value.__cause__, ImportError)
    assert "deliberately broken" in str(e.value.__cause__)
    assert "deliberately broken" in str(e.value)
    # not cached: asking again raises again
    with pytest.raises(BrokenBlockPluginError):
        get_block("fixture_broken")


def test_broken_plugin_error_wraps_any_exception(monkeypatch, tmp_path):
    dist = _make_dist(tmp_path, "attr-dist", "3.1", {"missing_attr": "mace_lr_fixture_plugin:DoesNotExist"})
    monkeypatch.setattr(registry, "_iter_entry_points", lambda: _eps(dist))
    with pytest.raises(
        BrokenBlockPluginError,
        match=r"'missing_attr' from distribution 'attr-dist' 3\.1 .*DoesNotExist.*AttributeError",
    ) as e:
        get_block("missing_attr")
    assert isinstance(e.value.__cause__, AttributeError)


def test_not_a_block_raises_type_error_naming_it():
    with pytest.raises(TypeError, match=r"NotABlock.*not a subclass of LongRangeBlock") as e:
        get_block("fixture_not_a_block")
    assert isinstance(e.value, NotABlockError)
    assert "mace_lr_fixture_plugin:NotABlock" in str(e.value)
    assert "fixture_not_a_block" in str(e.value)


# --------------------------------------------------------------------------- clashes


def _clash_eps(tmp_path):
    dist_a = _make_dist(tmp_path / "a", "pkg-a", "1.0", {"dup": "pkg_a.blocks:DupBlock"})
    dist_b = _make_dist(tmp_path / "b", "pkg-b", "2.5", {"dup": "pkg_b:Other"})
    return _eps(dist_a), _eps(dist_b)


@pytest.mark.parametrize("reverse", [False, True])
def test_clash_between_two_distributions(monkeypatch, tmp_path, caplog, reverse):
    eps_a, eps_b = _clash_eps(tmp_path)
    eps = eps_b + eps_a if reverse else eps_a + eps_b
    monkeypatch.setattr(registry, "_iter_entry_points", lambda: list(eps))
    caplog.set_level(logging.WARNING, logger="mace_lr.registry")

    assert available_blocks() == ["dup"]  # listing still works
    warnings = [r for r in caplog.records if r.name == "mace_lr.registry"]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert "pkg-a" in warnings[0].getMessage() and "pkg-b" in warnings[0].getMessage()

    expected = re.escape(
        "Block name 'dup' is registered by more than one entry point in group "
        "'mace_lr.blocks': distribution 'pkg-a' 1.0 -> 'pkg_a.blocks:DupBlock'; "
        "distribution 'pkg-b' 2.5 -> 'pkg_b:Other'."
    )
    with pytest.raises(BlockNameClashError, match=expected):
        get_block("dup")
    with pytest.raises(BlockNameClashError, match=expected):
        block_origin("dup")


def test_clash_resolved_by_runtime_overwrite(monkeypatch, tmp_path, caplog):
    eps_a, eps_b = _clash_eps(tmp_path)
    monkeypatch.setattr(registry, "_iter_entry_points", lambda: eps_a + eps_b)
    cls = _dummy_block("dup")
    with pytest.raises(BlockNameClashError, match="already provided by an installed package"):
        register_block("dup", cls)
    register_block("dup", cls, overwrite=True)
    caplog.set_level(logging.WARNING, logger="mace_lr.registry")
    caplog.clear()  # the INFO note of the overwrite itself may be captured if root logs INFO
    assert get_block("dup") is cls
    assert available_blocks() == ["dup"]
    assert not caplog.records  # explicit choice: no more clash warning


def test_clash_with_real_installed_distribution(monkeypatch, tmp_path):
    """End to end through importlib.metadata: a second dist claims 'fixture_constant'."""
    _make_dist(tmp_path, "mace-lr-clasher", "9.9", {"fixture_constant": "clasher:Block"})
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "fixture_constant" in available_blocks()
    with pytest.raises(
        BlockNameClashError,
        match=r"'mace-lr-clasher' 9\.9 -> 'clasher:Block'.*'mace-lr-fixture-plugin' 0\.0\.1 -> "
        r"'mace_lr_fixture_plugin:ConstantBlock'",
    ):
        get_block("fixture_constant")


def test_identical_duplicate_entry_points_are_not_a_clash(monkeypatch, tmp_path, caplog):
    # the same distribution seen twice (editable install + stale site-packages copy)
    target = {"dup": "mace_lr_fixture_plugin:ConstantBlock"}
    first = _make_dist(tmp_path / "editable", "pkg-a", "1.0", target)
    second = _make_dist(tmp_path / "site", "pkg-a", "0.9", target)
    monkeypatch.setattr(registry, "_iter_entry_points", lambda: _eps(first) + _eps(second))
    caplog.set_level(logging.WARNING, logger="mace_lr.registry")
    assert available_blocks() == ["dup"]
    import mace_lr_fixture_plugin

    assert get_block("dup") is mace_lr_fixture_plugin.ConstantBlock
    assert block_origin("dup")["distribution"] == "pkg-a"
    assert not [r for r in caplog.records if "more than one" in r.getMessage()]


# --------------------------------------------------------------------------- runtime


def test_register_overwrite_and_unregister():
    first = _dummy_block("runtime_demo")
    second = _dummy_block("runtime_demo")
    assert "runtime_demo" not in available_blocks()
    register_block("runtime_demo", first)
    assert get_block("runtime_demo") is first
    with pytest.raises(BlockNameClashError, match=r"'runtime_demo' is already registered at"):
        register_block("runtime_demo", second)
    assert get_block("runtime_demo") is first
    register_block("runtime_demo", second, overwrite=True)
    assert get_block("runtime_demo") is second
    unregister_block("runtime_demo")
    assert "runtime_demo" not in available_blocks()
    with pytest.raises(UnknownBlockError, match="Unknown long-range block 'runtime_demo'"):
        get_block("runtime_demo")
    with pytest.raises(KeyError, match="not registered at runtime"):
        unregister_block("runtime_demo")


def test_register_refuses_to_shadow_entry_point_unless_overwrite():
    import mace_lr_fixture_plugin

    shadow = _dummy_block("fixture_constant")
    with pytest.raises(
        BlockNameClashError,
        match=r"'fixture_constant' is already provided by an installed "
        r"package \(distribution 'mace-lr-fixture-plugin'",
    ):
        register_block("fixture_constant", shadow)
    assert get_block("fixture_constant") is mace_lr_fixture_plugin.ConstantBlock
    register_block("fixture_constant", shadow, overwrite=True)
    assert get_block("fixture_constant") is shadow
    assert block_origin("fixture_constant")["distribution"] is None
    unregister_block("fixture_constant")
    assert get_block("fixture_constant") is mace_lr_fixture_plugin.ConstantBlock
    with pytest.raises(KeyError, match="Entry-point blocks are removed by uninstalling"):
        unregister_block("fixture_constant")


def test_register_rejects_non_blocks_and_bad_names():
    class Plain:
        name = "plain"

    with pytest.raises(TypeError, match=r"registered as block 'plain'.*Plain.*not a subclass"):
        register_block("plain", Plain)
    with pytest.raises(TypeError, match="not a subclass"):
        register_block("plain", object())
    with pytest.raises(ValueError, match="non-empty string"):
        register_block("", _dummy_block(""))
    with pytest.raises(ValueError, match="non-empty string"):
        register_block(" spaced ", _dummy_block(" spaced "))
    assert "plain" not in available_blocks()


def test_register_warns_when_class_name_differs(caplog):
    caplog.set_level(logging.WARNING, logger="mace_lr.registry")
    register_block("alias_name", _dummy_block("real_name"))
    assert any(
        "registered as 'alias_name'" in r.getMessage() and "'real_name'" in r.getMessage()
        for r in caplog.records
    )


# --------------------------------------------------------------------------- origin


def test_block_origin_of_fixture_and_builtin():
    origin = block_origin("fixture_constant")
    assert origin == {
        "name": "fixture_constant",
        "distribution": FIXTURE_DIST,
        "version": md.version(FIXTURE_DIST),
        "target": "mace_lr_fixture_plugin:ConstantBlock",
    }
    assert origin["version"] == "0.0.1"
    les = block_origin("les")
    assert les["distribution"] == MAIN_DIST
    assert les["version"] == md.version(MAIN_DIST)
    assert les["target"] == "mace_lr.plugins.les:LESBlock"
    json.dumps(origin)  # must be serialisable into a saved model


def test_block_origin_of_runtime_block_and_unknown():
    cls = _dummy_block("origin_demo")
    register_block("origin_demo", cls)
    assert block_origin("origin_demo") == {
        "name": "origin_demo",
        "distribution": None,
        "version": None,
        "target": f"{__name__}:Dummy_origin_demo",
    }
    with pytest.raises(UnknownBlockError, match="Did you mean 'origin_demo'"):
        block_origin("origin_dem")
