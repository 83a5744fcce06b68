"""One weights file for all of a bundle's ONNX graphs.

Every graph that holds the encoder (guarded, plain, encoder_head) carries its weights, so graphs
written one by one hold them three times (about 1 GB for vit_b_16). Here each large initializer
moves to one external-data file (ONNX's own format: the tensor names a file, an offset and a
length), stored once per distinct content, so the ONNX graphs hold the weights once. onnx's
helper (`convert_model_to_external_data`) writes one file per model and shares nothing across
models, hence this. No graph file then nears protobuf's 2 GB limit either.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from edgeshort._optional import require

WEIGHTS_FILE = "weights.onnx.data"
# Smaller tensors stay inside their graph, as onnx's helper keeps them (the default threshold there too).
INLINE_BELOW = 1024
# Large tensors start at multiples of 64 KiB, Windows' mapping granularity (and a multiple of the 4 KiB
# page): ONNX Runtime memory-maps external data only from such offsets.
ALIGN_FROM = 64 * 1024
ALIGNMENT = 64 * 1024


def _tensors(graph, onnx):
    """(tensor, is an initializer) for every tensor of `graph` and its subgraphs (If / Loop / Scan bodies):
    torch's exporter writes subgraphs' large tensors to its external-data file too."""
    for tensor in graph.initializer:
        yield tensor, True
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.TENSOR:
                yield attribute.t, False
            for tensor in attribute.tensors:
                yield tensor, False
            subgraphs = [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else list(attribute.graphs)
            for subgraph in subgraphs:
                yield from _tensors(subgraph, onnx)


def _external_fields(tensor) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def _payload(tensor, initializer: bool, folder: Path, onnx) -> tuple[bytes, str | None] | None:
    """(the tensor's bytes, the external file they came from) for a tensor to move; None to keep it inline.
    Attribute tensors (a Constant's value) move only when already external, as onnx's helper leaves them."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        fields = _external_fields(tensor)
        offset, length = int(fields.get("offset", 0)), fields.get("length")
        with open(folder / fields["location"], "rb") as fh:
            fh.seek(offset)
            data = fh.read() if length is None else fh.read(int(length))
        return data, fields["location"]
    # Only raw_data moves verbatim; typed fields (float_data, ...) are small constants in these graphs.
    if initializer and tensor.HasField("raw_data") and len(tensor.raw_data) >= INLINE_BELOW:
        return tensor.raw_data, None
    return None


def share_onnx_weights(folder: str | Path, graph_files: list[str], weights_file: str = WEIGHTS_FILE) -> dict:
    """Move the large initializers of `graph_files` (ONNX files in `folder`), their subgraphs' and any
    tensor already external into one `weights_file` there, each distinct content once, and rewrite the
    graphs to point at it. External-data files the graphs used before (e.g. torch's `<graph>.onnx.data`)
    are deleted once read.

    Returns {"tensors", "distinct", "bytes_before", "bytes_after"}: the large tensors, how many are
    distinct, the bytes they took across the graphs, and the size of `weights_file` (alignment included)."""
    onnx = require("onnx", "offline")
    folder = Path(folder)
    stored: dict[bytes, tuple[int, int]] = {}
    replaced: set[str] = set()
    tensors = bytes_before = 0
    with open(folder / weights_file, "wb") as out:
        for name in graph_files:
            path = folder / name
            model = onnx.load(str(path), load_external_data=False)
            for tensor, initializer in _tensors(model.graph, onnx):
                found = _payload(tensor, initializer, folder, onnx)
                if found is None:
                    continue
                data, source = found
                if source is not None and source != weights_file:
                    replaced.add(source)
                tensors += 1
                bytes_before += len(data)
                key = hashlib.sha256(data).digest()
                if key not in stored:
                    if len(data) >= ALIGN_FROM:
                        out.write(b"\0" * (-out.tell() % ALIGNMENT))
                    stored[key] = (out.tell(), len(data))
                    out.write(data)
                offset, length = stored[key]
                tensor.ClearField("raw_data")
                tensor.data_location = onnx.TensorProto.EXTERNAL
                del tensor.external_data[:]
                for key_name, value in (("location", weights_file), ("offset", offset), ("length", length)):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = key_name, str(value)
            # Serialised as is: the tensors hold no raw data any more, so nothing else is written.
            path.write_bytes(model.SerializeToString())
    for source in replaced:
        (folder / source).unlink(missing_ok=True)
    return {"tensors": tensors, "distinct": len(stored), "bytes_before": bytes_before,
            "bytes_after": (folder / weights_file).stat().st_size}
