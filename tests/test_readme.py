"""The README's Python examples run as written."""

import re
import shutil
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_readme_python_examples_run(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert len(blocks) == 2  # "Using a converted model" and "From Python"
    shutil.copy(ROOT / "models" / "example.onnx", tmp_path / "model.onnx")
    monkeypatch.chdir(tmp_path)
    using, from_python = blocks
    namespace: dict[str, object] = {}
    exec(from_python, namespace)  # writes model.haste.onnx
    assert "True" in capsys.readouterr().out
    exec(using, namespace)
    assert namespace["logits"].shape == (1, 10)  # type: ignore[attr-defined]
