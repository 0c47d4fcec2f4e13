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
    for location in sorted(_external_locations(model.graph)):
        if location != allowed:
            raise ArtifactError(f"{path} keeps weights in {location!r}, not in {allowed!r} beside it as export "
                                f"writes them: not opened (a file from elsewhere? export again)")


def _external_locations(graph) -> set[str]:
    """The ``location`` of every external-data tensor in ``graph``: initializers, sparse ones, node attributes
    (Constant values) and subgraphs (If/Loop bodies), recursively."""
    from onnx import AttributeProto, TensorProto

    tensors = list(graph.initializer)
    tensors += [t for sparse in graph.sparse_initializer for t in (sparse.values, sparse.indices)]
    locations = set()
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == AttributeProto.TENSOR:
                tensors.append(attr.t)
            elif attr.type == AttributeProto.TENSORS:
                tensors.extend(attr.tensors)
            elif attr.type == AttributeProto.GRAPH:
                locations |= _external_locations(attr.g)
            elif attr.type == AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    locations |= _external_locations(sub)
    for tensor in tensors:
        if tensor.data_location == TensorProto.EXTERNAL:
            entries = {e.key: e.value for e in tensor.external_data}
            locations.add(entries.get("location", ""))
    return locations
