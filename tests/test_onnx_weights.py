"""A bundle's ONNX graphs share one weights file: each distinct tensor stored once, the graphs unchanged."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from onnx.external_data_helper import convert_model_to_external_data  # noqa: E402

from edgeshort.export.onnx_weights import ALIGNMENT, WEIGHTS_FILE, share_onnx_weights  # noqa: E402
from edgeshort.runtime.backends import open_session  # noqa: E402


def _linear(name: str, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """x (1, 64) -> x @ shared (+ bias) (@ own, where given)."""
    nodes = [helper.make_node("MatMul", ["x", "shared"], ["h"]), helper.make_node("Add", ["h", "bias"], ["a"])]
    out = "a"
    if "own" in weights:
        nodes.append(helper.make_node("MatMul", ["a", "own"], ["b"]))
        out = "b"
    width = weights.get("own", weights["shared"]).shape[1]
    graph = helper.make_graph(
        nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, [1, width])],
        [numpy_helper.from_array(value, key) for key, value in weights.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_graphs_share_one_copy_of_each_tensor_and_compute_the_same(tmp_path):
    rng = np.random.default_rng(0)
    shared = rng.standard_normal((64, 300)).astype(np.float32)  # 76.8 kB: large enough to be aligned
    bias = rng.standard_normal(300).astype(np.float32)  # 1.2 kB: moved, not aligned
    own = rng.standard_normal((300, 40)).astype(np.float32)
    first = _linear("first", {"bias": bias, "shared": shared})  # written first, so `shared` must be padded to align
    onnx.save(first, str(tmp_path / "first.onnx"))  # weights inside the graph
    second = _linear("second", {"shared": shared, "bias": bias, "own": own})
    convert_model_to_external_data(second, location="second.onnx.data", size_threshold=1024)
    onnx.save(second, str(tmp_path / "second.onnx"))  # weights in its own file, as torch writes them
    tiny = _linear("tiny", {"shared": shared[:, :2].copy(), "bias": bias[:2].copy()})  # under 1 kB: nothing moves
    onnx.save(tiny, str(tmp_path / "tiny.onnx"))
    x = rng.standard_normal((1, 64)).astype(np.float32)
    names = ["first.onnx", "second.onnx", "tiny.onnx"]
    before = {name: open_session(tmp_path / name, "onnxruntime").run({"x": x}) for name in names}

    stats = share_onnx_weights(tmp_path, names)

    assert not (tmp_path / "second.onnx.data").exists()  # read, then gone
    # shared and bias in both graphs, own once: five tensors, three distinct; tiny's stay inline.
    assert (stats["tensors"], stats["distinct"]) == (5, 3)
    assert stats["bytes_before"] == 2 * shared.nbytes + 2 * bias.nbytes + own.nbytes
    data = (tmp_path / WEIGHTS_FILE).read_bytes()
    assert stats["bytes_after"] == len(data) < shared.nbytes + bias.nbytes + own.nbytes + 2 * ALIGNMENT
    for name in names:
        model = onnx.load(str(tmp_path / name), load_external_data=False)
        for tensor in model.graph.initializer:
            fields = {entry.key: entry.value for entry in tensor.external_data}
            if name == "tiny.onnx":
                assert tensor.data_location != TensorProto.EXTERNAL and tensor.raw_data
                continue
            assert tensor.data_location == TensorProto.EXTERNAL and not tensor.raw_data
            assert fields["location"] == WEIGHTS_FILE
            offset, length = int(fields["offset"]), int(fields["length"])
            expected = {"shared": shared, "bias": bias, "own": own}[tensor.name]
            assert data[offset:offset + length] == expected.tobytes()
            if length >= ALIGNMENT:
                assert offset % ALIGNMENT == 0  # ONNX Runtime memory-maps only aligned offsets
        after = open_session(tmp_path / name, "onnxruntime").run({"x": x})
        for key, value in before[name].items():
            np.testing.assert_array_equal(after[key], value)


def test_tensors_of_subgraphs_move_too(tmp_path):
    """An If's branches hold their own initializers; torch's exporter writes them to its data file too."""
    rng = np.random.default_rng(1)
    weights = {side: rng.standard_normal((64, 300)).astype(np.float32) for side in ("then", "else")}

    def branch(side: str):
        return helper.make_graph(
            [helper.make_node("MatMul", ["x", f"w_{side}"], [f"y_{side}"])], side, [],
            [helper.make_tensor_value_info(f"y_{side}", TensorProto.FLOAT, [1, 300])],
            [numpy_helper.from_array(weights[side], f"w_{side}")])

    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["y"], then_branch=branch("then"), else_branch=branch("else"))], "if",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64]),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 300])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    convert_model_to_external_data(model, location="if.onnx.data", size_threshold=1024, convert_attribute=True)
    onnx.save(model, str(tmp_path / "if.onnx"))
    x = rng.standard_normal((1, 64)).astype(np.float32)
    feeds = [{"x": x, "cond": np.array(flag)} for flag in (True, False)]
    before = [open_session(tmp_path / "if.onnx", "onnxruntime").run(feed)["y"] for feed in feeds]

    assert share_onnx_weights(tmp_path, ["if.onnx"])["distinct"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["if.onnx", WEIGHTS_FILE]
    after = [open_session(tmp_path / "if.onnx", "onnxruntime").run(feed)["y"] for feed in feeds]
    for old, new in zip(before, after):
        np.testing.assert_array_equal(new, old)


def test_mapped_weights_leave_one_copy_in_memory_not_one_per_graph(tmp_path):
    """ONNX Runtime copies (prepacks) each graph's matrix weights; on the mapped shared file it keeps none."""
    import subprocess
    import sys

    weight = np.random.default_rng(2).standard_normal((2048, 2048)).astype(np.float32)  # 16 MiB
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2048])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2048])], [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    for name in ("a.onnx", "b.onnx"):  # two graphs holding the same weights, as guarded and plain do
        onnx.save(model, str(tmp_path / name))
    share_onnx_weights(tmp_path, ["a.onnx", "b.onnx"])
    # Each count in a fresh process: private memory (USS) added by loading and running both graphs.
    code = ("import sys, numpy as np, psutil\nfrom pathlib import Path\n"
            "from edgeshort.runtime.backends import open_session\n"
            "before = psutil.Process().memory_full_info().uss\n"
            "sessions = [open_session(Path(sys.argv[2]) / n, 'onnxruntime', map_weights=sys.argv[1] == '1') "
            "for n in ('a.onnx', 'b.onnx')]\n"
            "for s in sessions: s.run({'x': np.ones((1, 2048), np.float32)})\n"
            "print((psutil.Process().memory_full_info().uss - before) / 2**20)\n")
    added = {flag: float(subprocess.run([sys.executable, "-c", code, flag, str(tmp_path)], capture_output=True,
                                        text=True, check=True).stdout) for flag in ("0", "1")}
    assert added["0"] - added["1"] > 1.5 * weight.nbytes / 2**20  # measured: 60 MiB against 28 MiB
