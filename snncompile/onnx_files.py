"""What an ONNX file in a run directory may point at, checked before any runtime opens it.

An ONNX tensor can keep its bytes in another file (external data) named by a path inside the model. Export
writes one only past protobuf's 2 GB limit, always as ``<file>.data`` beside the model. A model that names
anything else (``../../home/me/.ssh/id_rsa``, an absolute path) is not one of ours: ONNX Runtime before its
own check (added late in 2025) read such a file as weights, and a received run directory is not to be trusted that far.
"""

from __future__ import annotations

from pathlib import Path

from .errors import ArtifactError

__all__ = ["require_own_external_data"]


def require_own_external_data(path: str | Path) -> None:
    """ArtifactError unless every tensor of the ONNX model at ``path`` keeps its bytes in the file itself or in
    ``<file>.data`` beside it. Reads the graph only (no weights); a file that does not parse is left to the
    runtime, whose error says more."""
    import onnx

    path = Path(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001  not a model: the runtime that opens it next reports it in its own words
        return
    allowed = path.name + ".data"
    locations = _external_locations(model.graph.initializer, model.graph.sparse_initializer, model.graph.node)
    for function in model.functions:  # local functions' bodies hold Constant nodes too
        locations |= _external_locations([], [], function.node)
    for location in sorted(locations):
        if location != allowed:
            raise ArtifactError(f"{path} keeps weights in {location!r}, not in {allowed!r} beside it as export "
                                f"writes them: not opened (a file from elsewhere? export again)")


def _external_locations(initializers, sparse_initializers, nodes) -> set[str]:
    """The ``location`` of every external-data tensor among a graph's ``initializers``, ``sparse_initializers``
    and its ``nodes``' attributes (Constant values, dense or sparse), subgraphs (If/Loop bodies) recursively."""
    from onnx import AttributeProto, TensorProto

    tensors = list(initializers)
    sparse = list(sparse_initializers)
    locations = set()
    for node in nodes:
        for attr in node.attribute:
            if attr.type == AttributeProto.TENSOR:
                tensors.append(attr.t)
            elif attr.type == AttributeProto.TENSORS:
                tensors.extend(attr.tensors)
            elif attr.type == AttributeProto.SPARSE_TENSOR:
                sparse.append(attr.sparse_tensor)
            elif attr.type == AttributeProto.SPARSE_TENSORS:
                sparse.extend(attr.sparse_tensors)
            elif attr.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS):
                for sub in [attr.g] if attr.type == AttributeProto.GRAPH else attr.graphs:
                    locations |= _external_locations(sub.initializer, sub.sparse_initializer, sub.node)
    tensors += [t for s in sparse for t in (s.values, s.indices)]
    for tensor in tensors:
        if tensor.data_location == TensorProto.EXTERNAL:
            entries = {e.key: e.value for e in tensor.external_data}
            locations.add(entries.get("location", ""))
    return locations
