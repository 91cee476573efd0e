"""The README's "Write your own block" example runs as written and passes the contract."""

import importlib
import pathlib
import re
import sys

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_write_your_own_block_example(tmp_path, monkeypatch):
    text = README.read_text()
    section = text.split("## Write your own block", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```py\n(.*?)```", section, flags=re.S)
    assert len(code.strip().splitlines()) < 100
    assert "mace_lr._" not in code, "the example must use public names only"
    # TorchScript reads the source of forward: run the example from a file
    (tmp_path / "readme_block_example.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    from mace_lr.registry import unregister_block

    try:
        module = importlib.import_module("readme_block_example")  # runs run_block_contract
        assert issubclass(module.ElementCharges, __import__("mace_lr").LongRangeBlock)
    finally:
        sys.modules.pop("readme_block_example", None)
        unregister_block("element_charges")
