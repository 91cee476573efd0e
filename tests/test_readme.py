"""The README's Python snippets run as written."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _snippets():
    text = README.read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_opens_with_two_commands():
    text = README.read_text()
    first = re.search(r"```bash\n(.*?)```", text, flags=re.S).group(1).strip().splitlines()
    assert [line.split()[0:2] for line in first] == [["./run", "main"], ["./run", "tests"]]


@pytest.mark.parametrize("index", range(len(_snippets())))
def test_readme_snippet_runs(index, tmp_path, monkeypatch, capsys):
    code = _snippets()[index]
    workdir = tmp_path / "repo"
    workdir.mkdir()
    if "../shared/foundation/" in code:
        # run beside a shared/ folder holding the real MACE files, like a clone in CI
        from test_foundation import FILES, FOUNDATION, MISSING

        if not all((FOUNDATION / name).is_file() for name in FILES):
            pytest.skip(MISSING)
        (tmp_path / "shared").mkdir()
        (tmp_path / "shared" / "foundation").symlink_to(FOUNDATION)
    monkeypatch.chdir(workdir)
    exec(compile(code, f"README snippet {index}", "exec"), {"__name__": "__readme__"})
    out = capsys.readouterr().out
    if "Madelung" in code:
        assert abs(float(out.split()[-1]) - 1.7475646) < 1e-6
