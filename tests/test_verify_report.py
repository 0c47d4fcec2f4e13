"""verify.json's keys and reading it back (snncompile.verify_report), without a runtime."""

import pytest

from snncompile.errors import ArtifactError
from snncompile.verify_report import read_reports, report_key


def test_report_keys_name_the_file_the_precision_and_the_test_split_when_not_the_defaults():
    assert report_key("ort-cpu") == "ort-cpu"
    assert report_key("ort-cpu", "model.onnx") == "ort-cpu:model.onnx"
    assert report_key("torch-fast", precision="bf16") == "torch-fast/bf16"
    assert report_key("ov-cpu", inputs="test") == "ov-cpu@test"
    assert report_key("trt", "model_step.onnx", "fp16", "test") == "trt:model_step.onnx/fp16@test"


def test_reading_verify_json_back(tmp_path):
    """None yet: no reports. Not a JSON object (a list) or not UTF-8: one line saying to move it aside."""
    path = tmp_path / "verify.json"
    assert read_reports(path) == {}
    path.write_text('{"ort-cpu": {"passed": true}}')
    assert read_reports(path) == {"ort-cpu": {"passed": True}}
    for damaged in (b"[]", b"\xff\xfe{", b"{"):
        path.write_bytes(damaged)
        with pytest.raises(ArtifactError, match="verify.json is corrupt: move it aside"):
            read_reports(path)
