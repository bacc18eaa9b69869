"""The README's Python section runs as written (on a tiny model in place of MODEL), so the docs cannot rot."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from helpers import make_model, make_tokenizer

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    text = README.read_text()
    section = text.split("\n## Python\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_python_section_has_blocks_and_uses_the_public_api():
    blocks = python_blocks()
    assert len(blocks) >= 4
    assert all("import conceptprobe" in blocks[0] for _ in [0])
    assert not any("from conceptprobe." in b for b in blocks), "the walkthrough uses the public API only"


@pytest.mark.slow
def test_readme_python_section_runs_end_to_end(tmp_path, monkeypatch):
    model_dir = tmp_path / "tiny"
    make_model("llama", layers=3).save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    monkeypatch.chdir(tmp_path)
    code = "\n".join(python_blocks())
    code, n = re.subn(r'^MODEL = ".*?"', f"MODEL = {str(model_dir)!r}", code, flags=re.M)
    assert n == 1
    namespace: dict = {"__name__": "readme"}
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - the README's own code
    assert namespace["X"].shape[0] == 7 * 20
    assert (tmp_path / "runs" / "bitwise-4" / "metrics.parquet").is_file()
    assert set(namespace["frame"]["kind"]) == {"probe", "icl", "heads"}
