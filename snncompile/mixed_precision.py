"""Reduced precision in the graph itself: convolutions and matrix products in fp16/bf16, spikes in fp32.

TensorRT 11 builds only *strongly typed* networks (the fp16/bf16 builder flags and per-layer precision
constraints are gone; 10.12 deprecated them, TensorRT-RTX follows 11), so a reduced-precision engine is
described by the types in its ONNX graph. :func:`mixed_precision` rewrites an exported fp32 graph so that
every ``Conv``, ``Gemm`` and ``MatMul`` reads its operands through a ``Cast`` to fp16/bf16 and hands its
result back through a ``Cast`` to fp32, and touches nothing else. The LIF recurrence, the threshold
compare, NeuNorm, pooling and voting therefore keep computing in fp32: a membrane is never rounded to
16 bits before it meets V_th. (Spikes are exact in either type; the weights and the sums over them are
what lose bits, and ``verify --precision fp16`` counts the flips that causes.)

Weights stay fp32 initializers behind their ``Cast`` (builders fold it), so one graph serves both types.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnx

__all__ = ["HEAVY_OPS", "mixed_precision"]

# The ops whose arithmetic moves to 16 bits: where the FLOPs are, and nothing that holds a membrane.
HEAVY_OPS = ("Conv", "Gemm", "MatMul")
# Conv accepts bfloat16 from opset 22 on (Gemm and MatMul since 13).
BF16_CONV_OPSET = 22


def mixed_precision(model: "onnx.ModelProto", precision: str) -> tuple["onnx.ModelProto", int]:
    """A copy of ``model`` whose :data:`HEAVY_OPS` compute in ``precision`` ('fp16' or 'bf16').

    Inputs and outputs of the graph keep their fp32 types, so a runner feeds and reads it exactly as the
    fp32 model. A bf16 graph with convolutions is first converted to opset 22 (where Conv takes bfloat16).

    Returns:
        (the new model, how many nodes now compute in ``precision``).
    """
    import onnx
    from onnx import TensorProto, helper

    low = {"fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}.get(precision)
    if low is None:
        raise ValueError(f"mixed_precision handles fp16 and bf16, not {precision!r}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    opset = next((o.version for o in out.opset_import if o.domain in ("", "ai.onnx")), 0)
    if low == TensorProto.BFLOAT16 and opset < BF16_CONV_OPSET and any(n.op_type == "Conv" for n in out.graph.node):
        from onnx import version_converter

        out = version_converter.convert_version(out, BF16_CONV_OPSET)

    graph = out.graph
    nodes, cast_of, converted = [], {}, 0
    for node in graph.node:
        if node.op_type not in HEAVY_OPS or node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        for i, name in enumerate(node.input):
            if not name:  # an omitted optional input
                continue
            if name not in cast_of:  # a tensor read by several heavy ops is cast once
                cast_of[name] = f"{name}__{precision}_in"
                nodes.append(helper.make_node("Cast", [name], [cast_of[name]], to=low, name=f"{name}/to_{precision}"))
            node.input[i] = cast_of[name]
        results = list(node.output)
        for i, name in enumerate(results):
            node.output[i] = f"{name}__{precision}_out"
        nodes.append(node)
        for name in results:  # the fp32 tensor the rest of the graph reads, under its old name
            nodes.append(helper.make_node("Cast", [f"{name}__{precision}_out"], [name], to=TensorProto.FLOAT,
                                          name=f"{name}/to_fp32"))
        converted += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return out, converted
