"""The README's Python API block runs as written (a fresh interpreter, in a directory laid out like the repo)."""

import re
import shutil
import subprocess
import sys

from conftest import REPO


def python_block(heading: str) -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index(heading):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_python_api_block_runs_as_written(tmp_path):
    (tmp_path / "models").mkdir()
    shutil.copy(REPO / "models" / "digits.toml", tmp_path / "models")
    result = subprocess.run([sys.executable, "-c", python_block("### Python API")], cwd=tmp_path, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    accuracy = float(re.search(r"accuracy on 32 test digits: ([\d.]+)", result.stdout).group(1))
    assert accuracy > 0.5  # 3 epochs of training, not chance (0.1)
    (run,) = (tmp_path / "export" / "digits").iterdir()
    assert {"model.onnx", "model_layers.onnx", "verify.json"} <= {p.name for p in run.iterdir()}
