"""The README as written: its Python API blocks run (a fresh interpreter, in a directory laid out like the repo), and
its key table names every config key."""

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
    """The API block, then the streaming block that continues it (plain ONNX Runtime over model_step.onnx)."""
    (tmp_path / "models").mkdir()
    shutil.copy(REPO / "models" / "digits.toml", tmp_path / "models")
    code = python_block("### Python API") + python_block("#### Streaming with ONNX Runtime alone")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    accuracy = float(re.search(r"accuracy on 32 test digits: ([\d.]+)", result.stdout).group(1))
    assert accuracy > 0.5  # 3 epochs of training, not chance (0.1)
    # digits has no spike flip between ONNX Runtime's two forms (test_export_onnx): the same scores, bit for bit
    assert "streamed = unrolled: True" in result.stdout
    (run,) = (tmp_path / "export" / "digits").iterdir()
    assert {"model.onnx", "model_layers.onnx", "model_step.onnx", "verify.json"} <= {p.name for p in run.iterdir()}


def test_every_config_key_is_in_the_key_table():
    """A user writing a TOML from scratch had the examples and the error's key list to go by."""
    import dataclasses

    from snncompile.config import _SECTIONS

    text = (REPO / "README.md").read_text()
    table = text[text.index("### Config keys"):text.index("### Event datasets")]
    missing = [f"{section}.{f.name}" for section, cls in _SECTIONS.items() for f in dataclasses.fields(cls)
               if f"`{section}.{f.name}`" not in table]
    assert not missing, f"keys not in the README's key table: {missing}"
