"""Export a trained run to standard ONNX: the network unrolled over T (or one streaming step).

Pipeline, all inside a staging folder of the run dir, moved into place only when every check passed
(a failure anywhere leaves the run dir as it was):

1. rebuild the network from the checkpoint; wrap it as :class:`~snncompile.graphs.UnrolledGraph` or
   :class:`~snncompile.graphs.StepGraph`;
2. export with the torch.export-based exporter (``torch.onnx.export(dynamo=True)``), dynamic batch;
3. clean the graph with onnxscript's optimizer (constant folding, dead code), then check that the
   cleaned graph computes exactly what the raw one did on ONNX Runtime;
4. ``onnx.checker`` with ``full_check``; an op allow-list (no Loop/Scan, custom or Python ops);
5. reference inputs (seeded random + real test samples when the dataset is present) and the torch
   reference outputs (fp32, TF32 off) as npz; manifest entry with versions, hashes and timings.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .artifacts import (environment, forget_artifact, fsync_path, interrupts_deferred, read_manifest,
                        record_artifact, require_writable, run_dir_lock, sha256_file, sha256_model, update_manifest)
from .config import MAX_STEPS, Config
from .errors import (ConfigError, DataError, ExportError, Interrupted, MissingDependencyError,
                     caused_by_interrupt, first_line)
from .export_options import DEFAULT_OPSET, DEFAULT_SAMPLES, EXPORT_PRECISIONS
from .exports import STEP_FILE, reference_files, unrolled_file
from .graphs import StepGraph, UnrolledGraph
from .runs import CHECKPOINT, load_network
from .scratch import remove_orphans, staging_folder

__all__ = ["ALLOWED_OPS", "ExportResult", "export_run", "export_again", "resolve_run_dir", "draw_reference_inputs",
           "EXPORTER"]

EXPORTER = "torch.export (torch.onnx.export dynamo=True) + onnxscript optimizer"
EXTERNAL_DATA_BYTES = 1_800_000_000  # below protobuf's 2 GB limit with headroom for the graph

# Standard ai.onnx ops the unrolled SNN may use. No Loop/Scan/If (T is unrolled statically), no custom
# domains, no Python ops: anything outside this list fails the export with the op named.
ALLOWED_OPS = frozenset({
    "Add", "AveragePool", "Cast", "Clip", "Concat", "Constant", "ConstantOfShape", "Conv", "Div", "Equal",
    "Expand", "Flatten", "Gather", "Gemm", "Greater", "Identity", "MatMul", "Mul", "Neg", "ReduceMean",
    "ReduceSum", "Reshape", "Round", "Shape", "Slice", "Split", "Squeeze", "Sub", "Transpose", "Unsqueeze", "Where",
})  # Clip and Round: the quantizers of an exact-arithmetic network (exact.py)

@dataclass
class ExportResult:
    path: Path
    form: str
    steps: int
    seconds: float
    onnx_bytes: int
    nodes_raw: int
    nodes_clean: int
    ops: list[str]
    n_random: int
    n_real: int
    opset: int = DEFAULT_OPSET
    precision: str = "fp32"
    reduced_precision_nodes: int = 0  # convs/matmuls computing in fp16/bf16
    split_tf32_layers: int = 0  # tf32x2: convs/linears split for TF32 (all of them)


def resolve_run_dir(path: str | Path) -> Path:
    """A run dir, or a checkpoint inside one -> the run dir."""
    path = Path(path)
    return path.parent if path.is_file() else path


def export_again(run_dir: Path, export: dict, **changes) -> ExportResult:
    """Export ``run_dir`` again with the settings of its manifest entry ``export`` (form, T, opset, order,
    precision, --layers, --rates, reference counts), ``changes`` applied: keyword arguments of
    :func:`export_run`, e.g. ``steps=16`` (bench --T) or ``layers=True`` (bench's _layers twin)."""
    n_random, n_real = export.get("reference_samples") or (DEFAULT_SAMPLES, DEFAULT_SAMPLES)
    settings = {"steps": export["T"], "opset": export.get("opset", DEFAULT_OPSET), "form": export.get("form", "unrolled"),
                "layers": bool(export.get("layers")), "rates": bool(export.get("rates")),
                "order": export.get("order", "layer"), "precision": export.get("precision", "fp32"),
                "n_random": n_random, "n_real": n_real}
    return export_run(run_dir, **{**settings, **changes})


def _require_onnx():
    try:
        import onnx
        import onnxscript  # noqa: F401
    except ImportError:
        raise MissingDependencyError("onnx/onnxscript", "onnx") from None
    return onnx


def draw_reference_inputs(cfg: Config, steps: int, n_random: int, n_real: int) -> tuple[dict[str, np.ndarray], str]:
    """Seeded random inputs ``[T, N, ...]`` and, when the dataset is present, real test samples.

    Returns (arrays, note). The random ones are :func:`~snncompile.data.random_input`'s.
    """
    from .data import load_dataset, random_input, to_time_major

    rand = random_input(cfg, n_random, torch.Generator().manual_seed(cfg.train.seed + 12345), steps)
    arrays = {"random": rand.numpy()}
    note = "seeded random"
    if n_real:
        try:
            ds = load_dataset(cfg, progress=False)
        except (DataError, ConfigError) as e:
            return arrays, f"{note}; no real samples ({e}; verify --test-set needs the dataset too)"
        n = min(n_real, len(ds.test))
        x = ds.test.x[:n]
        if not ds.static and x.shape[1] != steps:
            # not the dataset's fault: event frames are binned into the trained T, so only an export at it can use them
            return arrays, (f"{note}; no real samples (the test frames are binned into {x.shape[1]} steps, not the "
                            f"export's T = {steps}; export at T = {x.shape[1]} to verify on them)")
        arrays["real"] = to_time_major(x.float(), steps, ds.static).contiguous().numpy()
        arrays["real_labels"] = ds.test.y[:n].numpy()
        note = f"{note} + {n} real {ds.name} test samples"
    return arrays, note


@torch.no_grad()
def _torch_outputs(graph: UnrolledGraph, x: np.ndarray, batch: int = 64) -> dict[str, np.ndarray]:
    from .torch_settings import no_tf32

    chunks: dict[str, list[np.ndarray]] = {}
    with no_tf32():
        for start in range(0, x.shape[1], batch):
            outs = graph(torch.from_numpy(x[:, start : start + batch]))
            for name, out in zip(graph.output_names, outs):
                if "." not in name:  # scores / rates; per-layer traces are recomputed by verify
                    chunks.setdefault(name, []).append(out.numpy())
    return {k: np.concatenate(v) for k, v in chunks.items()}


@torch.no_grad()
def _torch_streamed(graph: StepGraph, x: np.ndarray, batch: int = 64) -> dict[str, np.ndarray]:
    """The step module's scores for ``x`` ``[T, N, ...]``: T calls from zero states, as a streaming runtime makes
    them (what the step form's reference outputs hold and its verify compares the torch runner with)."""
    from .torch_settings import no_tf32

    chunks = []
    with no_tf32():
        for start in range(0, x.shape[1], batch):
            frames = torch.from_numpy(x[:, start : start + batch])
            states = graph.zero_states(frames[0])
            for frame in frames:
                scores, *states = graph(frame, *states)
            chunks.append(scores.numpy())
    return {"scores": np.concatenate(chunks)}


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter logs a warning per missing torchvision op; none of them matter here."""
    names = ["torch.onnx", "torch.onnx._internal.exporter._registration", "onnxscript"]
    old = [logging.getLogger(n).level for n in names]
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            # Every state input shares the one batch dimension; the exporter says so once per input.
            warnings.filterwarnings("ignore", message=".*axis name: batch will not be used.*")
            yield
    finally:
        for n, level in zip(names, old):
            logging.getLogger(n).setLevel(level)


def _metadata(cfg: Config, manifest: dict, form: str, steps: int, outputs: list[str], inputs: dict) -> dict[str, str]:
    m = cfg.model
    dataset = manifest.get("dataset", {})
    return {
        "snncompile.version": __version__,
        "snncompile.form": form,
        "snncompile.T": str(steps),
        "snncompile.arch": m.arch,
        "snncompile.input_layout": "[T, B, C, H, W]" if form == "unrolled" else "[B, C, H, W] per step",
        "snncompile.input_shape": json.dumps(list(m.input_shape)),
        "snncompile.neuron": json.dumps({"v_th": m.v_th, "k_tau1": m.k_tau1, "a": m.a}),
        "snncompile.neunorm": json.dumps({"enabled": m.neunorm, "k_tau2": m.k_tau2, "before_fc": m.neunorm_before_fc}),
        "snncompile.normalisation": json.dumps({"mean": dataset.get("mean", []), "std": dataset.get("std", [])}),
        "snncompile.class_names": json.dumps(manifest.get("classes", [str(i) for i in range(m.classes)])),
        "snncompile.config_hash": cfg.hash(),
        "snncompile.exporter": EXPORTER,
        "snncompile.outputs": json.dumps(outputs),
        "snncompile.inputs": json.dumps(inputs),
    }


def _save_ir(model, path: Path) -> None:
    import onnx_ir as ir

    total = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    if total > EXTERNAL_DATA_BYTES:
        ir.save(model, str(path), external_data=path.name + ".data")
    else:
        ir.save(model, str(path))


def _check_graph(onnx, path: Path) -> list[str]:
    """onnx.checker (full) and the op allow-list; returns the sorted op types."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"onnx.checker rejected the exported graph: {first_line(e)}") from None
    model = onnx.load(str(path), load_external_data=False)
    domains = {n.domain for n in model.graph.node} - {"", "ai.onnx"}
    ops = sorted({n.op_type for n in model.graph.node})
    bad = sorted(set(ops) - ALLOWED_OPS)
    problems = [f"{what} {items}" for what, items in (("ops", bad), ("custom domains", sorted(domains)),
                                                       ("local functions", [f.name for f in model.functions])) if items]
    if problems:  # each part named: with only local functions this said "disallowed ops: []"
        raise ExportError(f"exported graph uses non-standard or disallowed {'; '.join(problems)}")
    return ops


def _example_args(graph, cfg: Config, steps: int, form: str) -> tuple[torch.Tensor, ...]:
    frame = torch.zeros(2, *cfg.model.input_shape)
    if form == "step":
        return (frame, *graph.zero_states(frame))
    return (frame.unsqueeze(0).expand(steps, *frame.shape).contiguous(),)


def export_run(
    run: str | Path,
    steps: int | None = None,
    opset: int = DEFAULT_OPSET,
    form: str = "unrolled",
    layers: bool = False,
    rates: bool = False,
    n_random: int = DEFAULT_SAMPLES,
    n_real: int = DEFAULT_SAMPLES,
    check_numerics: bool = True,
    order: str = "layer",
    precision: str = "fp32",
) -> ExportResult:
    """Export ``run`` (a run dir or its checkpoint) to ONNX; see the module docstring.

    Args:
        run: run directory or checkpoint path.
        steps: T to unroll (default: the T the model was trained with).
        opset: ONNX opset.
        form: 'unrolled' (``model.onnx``) or 'step' (``model_step.onnx``, explicit state).
        layers: also output every LIF layer's spikes and membrane ``[T, B, ...]`` (for verify), written
            as ``model_layers.onnx`` next to the plain model that runtimes and benchmarks use.
        rates: also output the output layer's firing rates ``[B, N]``.
        n_random, n_real: how many seeded random and real reference inputs to save.
        check_numerics: compare the cleaned graph against the raw export on ONNX Runtime.
        order: 'layer' (default, ``model.onnx``) or 'step': the same function unrolled per timestep
            (``model_per_step.onnx``), kept to measure what the layer-major layout buys.
        precision: 'fp32', or 'fp16'/'bf16' for a strongly typed mixed-precision graph (``model_fp16.onnx``):
            convs and matmuls in that type, the neurons in fp32 (see mixed_precision.py). The reference
            outputs stay the fp32 torch module's, so verify measures what the 16-bit arithmetic changes.
            'tf32x2': every conv/linear split for TF32 tensor cores (``model_tf32x2.onnx``, see
            split_tf32.py): weights into hi + lo parts, and where the input is not spikes the input too,
            in the graph. Where the runtime computes float convolutions in TF32 (the ort-cuda runner turns
            TF32 on for this file, for every layer of it), the spike layers are fp32-accurate and the analog
            ones between TF32 and fp32 (tensor cores truncate their sums); fp32 elsewhere.
    """
    onnx = _require_onnx()
    import onnxscript.optimizer

    if form not in ("unrolled", "step"):
        raise ConfigError(f"--form must be 'unrolled' or 'step', got {form!r}")
    run_dir = resolve_run_dir(run)
    require_writable(run_dir, "the exported model and its reference files")
    # hashed before the weights are read: should training replace the checkpoint in between, the export is recorded
    # as of the earlier one and verify asks for it again (the reverse would pass old weights off as current)
    checkpoint = run_dir / CHECKPOINT
    checkpoint_sha256 = sha256_file(checkpoint) if checkpoint.is_file() else None  # none: load_network says so
    cfg, net = load_network(run_dir)
    manifest = read_manifest(run_dir)
    steps = cfg.model.T if steps is None else steps
    _check_options(form, steps, layers, rates, order, precision)
    t0 = time.perf_counter()
    reference = StepGraph(net, steps) if form == "step" else UnrolledGraph(net, rates=rates, layers=layers, order=order)
    reference.eval()  # the reference outputs are always the trained fp32 module's
    graph, split_layers = (_split_tf32_graph(net, rates, layers, order) if precision == "tf32x2"
                           else (reference, 0))
    args = _example_args(graph, cfg, steps, form)
    input_names = graph.input_names if form == "step" else ["input"]
    output_names = graph.output_names
    file_name = STEP_FILE if form == "step" else unrolled_file(order, layers, precision)

    remove_orphans(run_dir)  # what an export or training killed outright left (SIGKILL: no cleanup ran)
    cleanup = contextlib.ExitStack()  # the staging folder goes with the try below, however it ends
    staging = cleanup.enter_context(staging_folder(run_dir, "export"))
    committed = False
    try:
        model = _torch_export(graph, args, opset, input_names, output_names, _dynamic_batch(form, args))
        nodes_raw = sum(1 for _ in model.graph)
        raw_path = staging / "raw.onnx"
        _save_ir(model, raw_path)
        onnxscript.optimizer.optimize(model)
        nodes_clean = sum(1 for _ in model.graph)
        in_shapes = {
            name: ([steps, None, *cfg.model.input_shape] if name == "input" and form == "unrolled" else [None, *a.shape[1:]])
            for name, a in zip(input_names, args)
        }
        for key, value in _metadata(cfg, manifest, form, steps, output_names, in_shapes).items():
            model.metadata_props[key] = value
        out_path = staging / file_name
        _save_ir(model, out_path)
        ops = _check_graph(onnx, out_path)

        arrays, ref_note = draw_reference_inputs(cfg, steps, n_random, n_real)
        extra = _write_references(reference, arrays, reference_files(steps, cfg.model.T, n_random, n_real, form),
                                  staging)
        numerics = _check_numerics(raw_path, out_path, graph, arrays, form) if check_numerics else "skipped"
        if form == "step":
            numerics += "; " + _check_step_module(graph, arrays["random"][:, :32])
        reduced = 0
        if precision in ("fp16", "bf16"):  # after the numerics check, which compares two fp32 graphs
            ops, opset, nodes_clean, reduced = _rewrite_mixed_precision(onnx, out_path, precision)
        seconds = time.perf_counter() - t0

        with interrupts_deferred():  # from here the files and their manifest entry change together
            onnx_bytes = _commit(run_dir, staging, file_name, list(extra.values()), {
                "form": form, "order": order, "T": steps, "opset": opset, "exporter": EXPORTER, "layers": layers,
                "rates": rates, "precision": precision, "reduced_precision_nodes": reduced,
                "split_tf32_layers": split_layers, "inputs": in_shapes, "outputs": output_names, "ops": ops,
                "nodes_raw": nodes_raw, "nodes_clean": nodes_clean, "export_seconds": round(seconds, 3),
                "checkpoint_sha256": checkpoint_sha256,  # what verify and bench compare the run's checkpoint with
                "reference": ref_note, "reference_files": list(extra), "reference_samples": [n_random, n_real],
                "cleaned_vs_raw": numerics,
                "versions": {**environment(), "onnx": onnx.__version__, "onnxscript": _version("onnxscript"),
                             "onnx_ir": _version("onnx_ir"), "onnxruntime": _version("onnxruntime")},
            })
            committed = True
    except KeyboardInterrupt:
        if committed:  # the Ctrl-C came while the files were moved into place, and was held until they were
            raise Interrupted(f"export interrupted as it finished: {run_dir / file_name} and its manifest entry "
                              "were written whole") from None
        raise Interrupted(f"export interrupted: nothing of it was written; {run_dir} is as it was") from None
    finally:
        cleanup.close()
    return ExportResult(run_dir / file_name, form, steps, seconds, onnx_bytes, nodes_raw, nodes_clean, ops,
                        n_random, int(arrays.get("real_labels", np.zeros(0)).shape[0]), opset, precision, reduced,
                        split_layers)


def _split_tf32_graph(net, rates: bool, layers: bool, order: str) -> tuple[UnrolledGraph, int]:
    """The unrolled graph of a copy of ``net`` with every conv/linear split for TF32 (``tf32x2``), and how many
    layers were split. Analog layers too: a runtime's TF32 switch covers the whole session, every conv/linear of
    the file."""
    import copy

    from .split_tf32 import apply_split_tf32

    split_net = copy.deepcopy(net)
    split_layers = apply_split_tf32(split_net, analog=True)
    return UnrolledGraph(split_net, rates=rates, layers=layers, order=order).eval(), split_layers


def _dynamic_batch(form: str, args: tuple) -> tuple:
    """torch.export's dynamic shapes: the batch axis of every input (axis 1 of the unrolled ``[T, B, ...]``,
    axis 0 of each step input and state)."""
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    if form == "step":  # forward(x_t, output_sum, *states): the varargs are one nested tuple
        return ({0: batch}, {0: batch}, tuple({0: batch} for _ in args[2:]))
    return ({1: batch},)


def _write_references(reference, arrays: dict[str, np.ndarray], names: tuple[str, str], staging: Path) -> dict[str, Path]:
    """Save the reference inputs ``arrays`` and the torch ``reference`` module's outputs on them (streamed, for a
    step module) into ``staging`` under ``names``; returns ``{name: path}``."""
    outputs_of = _torch_streamed if isinstance(reference, StepGraph) else _torch_outputs
    outputs = {f"{split}/{name}": out for split in ("random", "real") if split in arrays
               for name, out in outputs_of(reference, arrays[split]).items()}
    np.savez(staging / names[0], **arrays)
    np.savez(staging / names[1], **outputs)
    return {name: staging / name for name in names}


def _check_options(form: str, steps: int, layers: bool, rates: bool, order: str, precision: str) -> None:
    """A one-line ConfigError for export options that do not go together (see :func:`export_run`)."""
    if not 1 <= steps <= MAX_STEPS:  # as model.T: --T 5000 ran for minutes before failing
        raise ConfigError(f"--T must be 1 to {MAX_STEPS}, got {steps}")
    if form == "step" and (layers or rates or order != "layer"):
        raise ConfigError("--layers/--rates/--order apply to the unrolled form only")
    if order not in ("layer", "step"):
        raise ConfigError(f"--order must be 'layer' or 'step', got {order!r}")
    if precision not in EXPORT_PRECISIONS:
        raise ConfigError(f"--precision must be one of {', '.join(EXPORT_PRECISIONS)}, got {precision!r}")
    if form == "step" and precision != "fp32":
        raise ConfigError(f"--precision {precision} applies to the unrolled form only")


def _torch_export(graph, args: tuple, opset: int, input_names: list[str], output_names: list[str], dynamic: tuple):
    """``graph`` through torch's exporter (torch.export, unoptimised) at ``opset``: its onnx_ir model, or a
    one-line ExportError (a Ctrl-C the exporter wrapped stays a KeyboardInterrupt)."""
    try:
        with _quiet_exporter(), torch.no_grad():
            program = torch.onnx.export(
                graph, args, dynamo=True, optimize=False, opset_version=opset, input_names=input_names,
                output_names=output_names, dynamic_shapes=dynamic, verbose=False,
            )
    except Exception as e:  # the exporter raises many types; report the first line
        if caused_by_interrupt(e):  # a Ctrl-C the exporter wrapped into its own error
            raise KeyboardInterrupt from None
        raise ExportError(f"torch.onnx.export failed: {first_line(e, limit=300)}") from None
    model = program.model
    written = model.opset_imports.get("")
    if written != opset:  # below 18 torch converts down and, where that fails, quietly keeps its own opset
        raise ExportError(f"torch's exporter could not write opset {opset} (it wrote {written}): choose --opset "
                          f"{written} or one it can convert to")
    return model


def _rewrite_mixed_precision(onnx, path: Path, precision: str) -> tuple[list[str], int, int, int]:
    """The fp32 graph at ``path`` rewritten in place as a strongly typed fp16/bf16 one (mixed_precision.py):
    its ops, opset (a bf16 Conv needs 22), node count with the casts, and the nodes now in 16 bits."""
    import onnx_ir as ir

    from .mixed_precision import mixed_precision

    typed, reduced = mixed_precision(onnx.load(str(path)), precision)
    for old in path.parent.glob(path.name + "*"):  # external data is appended to, never overwritten
        old.unlink()
    _save_ir(ir.serde.deserialize_model(typed), path)
    opset = next(o.version for o in typed.opset_import if o.domain in ("", "ai.onnx"))
    return _check_graph(onnx, path), opset, len(typed.graph.node), reduced


def _commit(run_dir: Path, staging: Path, file_name: str, references: list[Path], entry: dict) -> int:
    """Move a finished export from ``staging`` into ``run_dir`` (each rename atomic; data files before the
    model) and record it in the manifest. Returns the model's bytes, external data included."""
    # under the run dir's lock: another export of the same file committing at once lands whole, before or after
    with run_dir_lock(run_dir):
        moved = sorted(staging.glob(file_name + ".data")) + [staging / file_name] + references
        # hashed here, not after the move: a concurrent export of the same name that lands in between would otherwise
        # have its file certified by this export's entry (another T's references); now verify sees the mismatch
        sha256 = sha256_model(staging / file_name)
        for src in moved:
            fsync_path(src)
            src.replace(run_dir / src.name)
        fsync_path(run_dir)
        if not any(src.name == file_name + ".data" for src in moved):  # an earlier export's, unused now
            forget_artifact(run_dir, file_name + ".data")
        onnx_bytes = sum(p.stat().st_size for p in run_dir.glob(file_name + "*"))
        update_manifest(run_dir, exports={file_name: {**entry, "onnx_bytes": onnx_bytes, "sha256": sha256}})
        record_artifact(run_dir, file_name)
        if (run_dir / (file_name + ".data")).is_file():
            record_artifact(run_dir, file_name + ".data")
        for path in references:
            record_artifact(run_dir, path.name)
        return onnx_bytes


def _version(module: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module.replace("_", "-"))
    except PackageNotFoundError:
        return "absent"


def _check_numerics(raw_path: Path, clean_path: Path, graph, arrays: dict, form: str) -> str:
    """The optimizer must not change a single output value: compare raw vs cleaned on ORT CPU."""
    try:
        import onnxruntime as ort  # noqa: F401  (presence only; the runner module does the work)
    except ImportError:
        return "not checked (onnxruntime absent)"
    from .backends.ort import session_outputs

    x = arrays["random"][:, :32]
    if form == "step":
        frame = torch.from_numpy(x[0])
        states = [s.numpy() for s in graph.zero_states(frame)]
        feed = dict(zip(graph.input_names, [x[0], *states]))
    else:
        feed = {"input": x}
    # literal: this checks onnxscript's rewrites, not the ones ONNX Runtime makes when it loads a file
    raw = session_outputs(raw_path, feed, literal=True)
    clean = session_outputs(clean_path, feed, literal=True)
    for name in raw:
        if not np.array_equal(raw[name], clean[name]):
            diff = float(np.abs(raw[name] - clean[name]).max())
            raise ExportError(f"the cleaned graph differs from the raw export on output {name!r} (max abs {diff:g})")
    return f"identical on {x.shape[1]} inputs (onnxruntime CPU, graphs run as written)"


def _check_step_module(graph: StepGraph, x: np.ndarray) -> str:
    """The step module, called T times from zero states on ``x`` ``[T, N, ...]``, must compute the unrolled
    network's scores ``[N, classes]`` exactly.

    Both run in torch with the same kernels in the same order (the unrolled network step-major), so any
    difference is a wrong state carried between calls, not rounding. Whether the exported file computes
    the same spikes in another runtime is verify's question: ONNX Runtime's convolutions round differently
    from torch's, and verify tells those near-threshold flips apart from real ones.
    """
    streamed = _torch_streamed(graph, x)["scores"]
    unrolled = _torch_outputs(UnrolledGraph(graph.net, order="step"), x)["scores"]
    if not np.array_equal(streamed, unrolled):
        raise ExportError(f"{graph.steps} calls of the step module differ from the unrolled network "
                          f"(max abs {float(np.abs(streamed - unrolled).max()):g})")
    return f"{graph.steps} streamed torch steps == unrolled torch scores on {x.shape[1]} inputs"
