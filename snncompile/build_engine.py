"""`snncompile build`: a TensorRT engine from a run's model.onnx (or another export, the step form too),
recorded in the manifest."""

from __future__ import annotations

from pathlib import Path

from .artifacts import atomic_write_json, interrupts_deferred, record_artifact, update_manifest
from .errors import ArtifactError, ConfigError
from .exports import current_export, exported_file_changed
from .scratch import remove_orphans

__all__ = ["build_run"]

def build_run(run_dir: str | Path, precision: str = "fp32", batch: str = "1:16:128", workspace_mb: int = 4096,
              timing_cache: str | Path | None = None, model_file: str = "model.onnx") -> dict:
    """Build ``<model>_<precision>.plan`` (+ ``.json`` sidecar) for this GPU from ``model_file``."""
    from .backends.trt import ENGINE_PRECISION, BuildOptions, build_engine, engine_name, parse_profile

    options = BuildOptions(precision, parse_profile(batch), workspace_mb, Path(timing_cache) if timing_cache else None)
    options.validate()
    run_dir = Path(run_dir)
    # older weights would fail verify; a step export builds an engine of one step, which verify and bench stream
    export = current_export(run_dir, model_file, file_needed=True)
    # the sidecar records the export's hash as the engine's source: another file built under it (another run's
    # copied in) would pass as the run's engine
    if (changed := exported_file_changed(run_dir, model_file, export)) is not None:
        raise ArtifactError(changed)
    typed = export.get("precision", "fp32")
    fits = ENGINE_PRECISION.get(typed, typed)  # a tf32x2 export (split for TF32) is built with TF32 on
    if typed != "fp32" and precision != fits:  # a typed export builds only as what it was typed for: another
        # precision would mislabel the engine (fp32 over fp16 convs) or cast its casts again
        raise ConfigError(f"{model_file} is a {typed} export: build it with --precision {fits} (or build model.onnx)")
    engine = run_dir / engine_name(model_file, precision)
    remove_orphans(run_dir)  # an engine half-written by a build killed outright
    sidecar = build_engine(run_dir / model_file, engine, options, int(export["T"]), typed=typed != "fp32",
                           form=export.get("form", "unrolled"))
    if typed != "fp32":  # the export did the typing: its count, not the build's (which parsed it as it was)
        sidecar["reduced_precision_nodes"] = int(export.get("reduced_precision_nodes", 0))
    sidecar["onnx_sha256"] = export["sha256"]  # the runner refuses the engine once the file is re-exported
    with interrupts_deferred():  # the engine is written: its sidecar and manifest entry follow it
        atomic_write_json(engine.with_suffix(".json"), sidecar)
        update_manifest(run_dir, engines={engine.name: sidecar})
        record_artifact(run_dir, engine.name)
        record_artifact(run_dir, engine.with_suffix(".json").name)
    return sidecar
