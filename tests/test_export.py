"""Export: the bundle reproduces torch on both backends, the guard equals scikit-learn, bad runs fail clearly."""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from edgeshort.errors import (
    BundleError,
    InputError,
    MissingDependencyError,
    ParityError,
    UnsupportedModelError,
)
from edgeshort.export import ExportOptions, export_bundle
from edgeshort.runtime.backends import open_session
from edgeshort.runtime.bundle import SEAL, load_bundle, manifest_seal, write_manifest

TOLERANCE = 1e-4


def test_demo_bundle_parity_is_recorded_and_within_tolerance(demo_bundle, demo_result):
    manifest = demo_bundle.manifest
    # The bundle names its run by content, not only by path; the run records when and with what it was fitted.
    run = json.loads((demo_result.run_dir / "run.json").read_text())
    assert manifest["run"]["model_sha256"] == run["model_sha256"] == demo_result.weights_sha256
    assert manifest["run"]["data_source"] == run["data_source"] and manifest["run"]["config"] == run["config"]
    assert run["created"].endswith("Z") and run["versions"]["torch"] and run["versions"]["scikit-learn"]
    if (demo_bundle.root / "knn_skl2onnx.onnx").is_file():
        onnx = pytest.importorskip("onnx")
        knn = onnx.load(str(demo_bundle.root / "knn_skl2onnx.onnx"))
        assert knn.graph.name == "knn_skl2onnx"  # skl2onnx's own is a random uuid
        assert [o.domain for o in knn.opset_import] == sorted(o.domain for o in knn.opset_import)
    parity = manifest["parity"]
    assert parity["passed"] and parity["tolerance"] == TOLERANCE
    assert set(parity["backends"]) == {"onnxruntime", "openvino"}
    for backend, graphs in parity["backends"].items():
        assert set(graphs) == {"guarded", "plain", "embed", "guard", "encoder_head"}
        for graph, figures in graphs.items():
            for key, value in figures.items():
                if key.endswith("_mismatches"):
                    assert value == 0, (backend, graph, key)
                elif "logits" in key:
                    assert value <= TOLERANCE, (backend, graph, key, value)
    # The guard's MatMul + TopK KNN flags exactly what scikit-learn's KNN flags (and skl2onnx agrees).
    assert manifest["knn_cross_check"]["mismatches_vs_sklearn"] == 0
    assert manifest["knn_cross_check"]["mismatches_vs_guard_graph"] == 0
    assert {key: manifest["onnx"][key] for key in ("opset", "ir_version")} == {"opset": 20, "ir_version": 10}
    assert manifest["guard"]["has_dfr"] is True
    assert manifest["guard"]["warnings"] == []  # the demo run's ablation raised validation accuracy
    for name in ("guarded.onnx", "guarded.xml", "guarded.bin", "manifest.json"):
        assert (demo_bundle.root / name).is_file()
    assert not list(demo_bundle.root.glob("*.pkl")) and not list(demo_bundle.root.glob("*.pt"))


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_fused_graph_equals_split_chain(demo_bundle, demo_data, backend):
    fmt = "onnx" if backend == "onnxruntime" else "openvino"
    session = {g: open_session(demo_bundle.path(g, fmt), backend) for g in ("guarded", "embed", "guard", "encoder_head")}
    images = np.stack([x for _, b in demo_data["test"].subset(np.arange(0, 800, 25)).batches(
        demo_bundle.preprocessing, 64) for x in b])
    fused = session["guarded"].run({"images": images})
    tokens = session["embed"].run({"images": images})["tokens"]
    guard = session["guard"].run({"tokens": tokens})
    head = session["encoder_head"].run({"tokens": tokens, "keep": guard["keep"]})
    for key in ("flags", "raw_flags", "present"):
        assert np.array_equal(fused[key], guard[key])
    np.testing.assert_allclose(fused["saliency"], guard["saliency"], atol=1e-5)
    np.testing.assert_allclose(fused["ablated_logits"], head["logits"], atol=TOLERANCE)
    np.testing.assert_allclose(fused["dfr_logits"], head["dfr_logits"], atol=TOLERANCE)
    assert fused["present"].any() and not fused["present"].all()


@pytest.mark.parametrize("contrast", ["nearest", "mean"])
def test_guard_graph_tints_as_the_detector_does(demo_result, demo_data, contrast):
    """The exported guard computes the tint of either contrast as the offline detector does, so a bundle of a run
    saved before `saliency` existed ("mean") keeps its tint."""
    from dataclasses import replace

    from edgeshort.export.graphs import KeyGuard

    images = np.stack([x for _, b in demo_data["test"].subset(np.arange(0, 800, 20)).batches(
        demo_result.adapter.preprocessing, 64) for x in b])
    with torch.no_grad():
        keys = demo_result.adapter.keys(demo_result.adapter.embed(torch.from_numpy(images)), -1)
    config = replace(demo_result.config, saliency=contrast)
    # Scaled as a fit with this contrast scales it (the shared fixture was fitted with "nearest").
    from edgeshort.detect.keymaps import saliency_distance_maps

    scale = float(np.percentile(saliency_distance_maps(keys.numpy(), contrast, demo_result.knn,
                                                       demo_result.clean_keys), 99.9))
    result = replace(demo_result, config=config, saliency_scale=scale)
    with torch.no_grad():
        graph = KeyGuard(result)(keys)[-1].numpy()
    offline = result.saliency_maps(keys.numpy())
    np.testing.assert_allclose(graph, offline, atol=1e-4, rtol=0)
    assert offline.max() > 0.5 and offline.min() < 0.1  # a tint that varies, not one clipped flat


def test_int8_holds_out_its_check_images_first():
    from edgeshort.export.quantize import INT8_CHECK_SIZE, int8_split

    for count, calibrate_count, check_count in ((1500, 300, 500), (400, 200, 200), (301, 151, 150), (2, 1, 1)):
        calibrate, check = int8_split(count, 300)
        assert (len(calibrate), len(check)) == (calibrate_count, check_count), count
        assert not set(calibrate) & set(check) and len(check) <= INT8_CHECK_SIZE
    calibrate, check = int8_split(1, 300)  # nothing to hold out: checked in-sample, and the manifest says so
    assert calibrate.tolist() == [0] and check.size == 0


def test_int8_export_keeps_nncf_info_lines_out_of_the_output():
    """nncf logs each operation the guard's ignored scope leaves unquantised at INFO (about 40 lines per
    export); progress bars stay unless progress is off, and the loggers are restored afterwards."""
    import logging

    import rich

    from edgeshort.export.quantize import _nncf_output

    nncf_logger, torch_cpp = logging.getLogger("nncf"), logging.getLogger("torch.utils.cpp_extension")
    before = (nncf_logger.level, torch_cpp.level, rich.get_console().quiet)
    nncf_logger.setLevel(logging.INFO)
    try:
        for progress in (True, False):
            with _nncf_output(progress):
                assert not nncf_logger.isEnabledFor(logging.INFO) and nncf_logger.isEnabledFor(logging.WARNING)
                assert not torch_cpp.isEnabledFor(logging.WARNING)  # "No CUDA runtime is found" on a CUDA build
                assert rich.get_console().quiet is (not progress or before[2])
            assert nncf_logger.level == logging.INFO and rich.get_console().quiet is before[2]
    finally:
        nncf_logger.setLevel(before[0])
    assert torch_cpp.level == before[1]


def test_int8_warns_when_its_guard_finds_shortcuts_on_other_images():
    """A DFR head scores every image, so final labels can agree while the INT8 guard stops flagging (a
    walkthrough's: 97.5% final labels, 64.2% shortcut decisions, 8 of 83 sticker images flagged against 74)."""
    from edgeshort.export.quantize import int8_warning

    record = {"check_size": 500, "check_held_out": True, "final_label_agreement": 0.996, "present_agreement": 1.0}
    assert int8_warning(record) is None
    warning = int8_warning({**record, "present_agreement": 0.642})
    assert warning.startswith("INT8 changes whether a shortcut is found on 179 of 500 held-out images (35.8%) against "
                              "f32, so its guard masks other images than the f32 guard; check it on labelled test")
    both = int8_warning({**record, "check_size": 120, "final_label_agreement": 0.975, "present_agreement": 0.642})
    assert both.startswith("INT8 changes the final label of 3 of 120 held-out images (2.5%) against f32; INT8 changes "
                           "whether a shortcut is found on 43 of 120")
    assert "checked on only 1 image, too few" in int8_warning({**record, "check_size": 1, "check_held_out": False})


def test_bundle_round_trip_rejects_tampering_and_newer_formats(demo_bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(demo_bundle.root, copy)
    assert load_bundle(copy).manifest["files"] == demo_bundle.manifest["files"]

    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["format"] = 99
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="bundle format 99 is newer than this edgeshort reads"):
        load_bundle(copy)
    manifest["format"] = 1
    manifest["guard"]["has_dfr"] = not manifest["guard"]["has_dfr"]  # edited and re-sealed: its graphs say otherwise
    write_manifest(copy, manifest)
    with pytest.raises(BundleError, match="says has_dfr .* the manifest was edited"):
        load_bundle(copy)
    manifest["guard"]["has_dfr"] = not manifest["guard"]["has_dfr"]
    write_manifest(copy, manifest)
    from edgeshort.runtime import Guard
    from edgeshort.runtime.bundle import sha256_file

    assert Guard.load(copy, backend="onnxruntime").info.manifest_sha256 == sha256_file(copy / "manifest.json")

    data = bytearray((copy / "plain.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "plain.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="plain.onnx' does not match its manifest hash"):
        load_bundle(copy)

    (copy / "plain.onnx").unlink()
    with pytest.raises(BundleError, match="plain.onnx' is missing"):
        load_bundle(copy)
    with pytest.raises(BundleError, match="not an edgeshort bundle"):
        load_bundle(tmp_path)


def test_a_bundles_onnx_graphs_hold_the_weights_once(demo_bundle, tmp_path):
    """guarded, plain and encoder_head each hold the encoder; their ONNX files share one weights file."""
    import onnx

    root = demo_bundle.root
    weights = root / "weights.onnx.data"
    held = {}
    for graph, entry in demo_bundle.manifest["graphs"].items():
        if "onnx" not in entry["files"]:
            continue
        assert entry["onnx_external_data"] == "weights.onnx.data"
        model = onnx.load(str(root / entry["files"]["onnx"]), load_external_data=False)
        external = [{e.key: e.value for e in t.external_data} for t in model.graph.initializer if t.external_data]
        assert external and {e["location"] for e in external} == {"weights.onnx.data"}
        held[graph] = sum(int(e["length"]) for e in external)
    assert sorted(f for f in os.listdir(root) if ".onnx." in f) == ["weights.onnx.data"]  # no per-graph files left
    # The guarded graph alone holds every weight (encoder, guard, heads): the shared file is about one copy.
    assert weights.stat().st_size < 1.15 * held["guarded"]
    assert sum(held.values()) > 2.5 * weights.stat().st_size
    recorded = demo_bundle.manifest["onnx"]["weights"]
    assert recorded["bytes_after"] == weights.stat().st_size and recorded["distinct"] < recorded["tensors"]
    assert demo_bundle.manifest["files"]["weights.onnx.data"]["bytes"] == weights.stat().st_size

    copy = tmp_path / "bundle"
    shutil.copytree(root, copy)
    data = bytearray((copy / "weights.onnx.data").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "weights.onnx.data").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="weights.onnx.data' does not match its manifest hash"):
        load_bundle(copy)
    shutil.copy(root / "weights.onnx.data", copy / "weights.onnx.data")
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["files"]["weights.onnx.data"]  # unhashed, ONNX Runtime would read it unverified
    manifest[SEAL] = manifest_seal(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="lists no hash for its graph file 'weights.onnx.data'"):
        load_bundle(copy)


def test_ir_newer_than_the_runtime_is_rejected(demo_bundle, tmp_path):
    import onnx

    path = tmp_path / "embed.onnx"
    model = onnx.load(str(demo_bundle.root / "embed.onnx"))
    model.ir_version = 99
    onnx.save(model, str(path))
    with pytest.raises(BundleError, match="IR version 99, newer than the installed runtime reads"):
        open_session(path, "onnxruntime")


def test_runs_that_cannot_be_exported_fail_clearly(demo_result, demo_data, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(demo_result.run_dir, run)
    (run / "knn.npz").unlink()
    with pytest.raises(InputError, match="has no knn.npz"):
        export_bundle(run, tmp_path / "b1", calibration=demo_data["val"])

    run2 = tmp_path / "run2"
    shutil.copytree(demo_result.run_dir, run2)
    torch.save(torch.nn.Linear(3, 3), run2 / "model.pt")
    with pytest.raises(UnsupportedModelError, match="no adapter for a torch.nn.modules.linear.Linear"):
        export_bundle(run2, tmp_path / "b2", calibration=demo_data["val"])

    # A missing extra is named before any work, not after the ONNX export and the parity check.
    for options, blocked, extra in ((ExportOptions(int8=True), "nncf", "int8"), (ExportOptions(), "openvino", "openvino")):
        with pytest.MonkeyPatch.context() as patch:
            patch.setitem(sys.modules, blocked, None)  # makes `import` fail, as when not installed
            patch.setattr("edgeshort.export.exporter.graph_specs", lambda *a: pytest.fail("the export began"))
            with pytest.raises(MissingDependencyError, match=rf"pip install 'edgeshort\[{extra}\]'"):
                export_bundle(demo_result, tmp_path / "b3", options, calibration=demo_data["val"])
        assert not (tmp_path / "b3").exists() and not list(tmp_path.glob(".b3.partial-*"))

    with pytest.raises(InputError, match="expected formats"):
        ExportOptions(formats=("tflite",))
    with pytest.raises(InputError, match="FP16 weights are OpenVINO IR's.*add 'openvino'"):
        ExportOptions(formats=("onnx",), weights="fp16")
    with pytest.raises(InputError, match="expected a tolerance above 0.*got -1"):
        ExportOptions(tolerance=-1)
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "x").write_text("x")
    with pytest.raises(BundleError, match="exists and is not empty"):
        export_bundle(demo_result, occupied, calibration=demo_data["val"])


@pytest.mark.slow
def test_a_models_own_preprocessing_reaches_the_edge(tmp_path):
    """A run fitted with non-default normalisation, resize filter and centre crop: the runtime, fed
    the (non-square) image files, predicts what torch predicted, because the bundle carries that
    preprocessing."""
    from edgeshort.data import ImageDataset
    from edgeshort.detect import DetectorConfig, ShortcutDetector
    from edgeshort.models import load_adapter
    from edgeshort.models.tiny import TinyViT
    from edgeshort.runtime import Guard

    torch.manual_seed(0)
    adapter = load_adapter(TinyViT(image_size=32, patch_size=8, dim=32, depth=1, num_heads=2)).set_preprocessing(
        mean=(0.2, 0.3, 0.4), std=(0.9, 0.8, 0.7), interpolation="bicubic", crop_pct=0.8)
    rng = np.random.default_rng(0)
    data = ImageDataset.from_arrays(rng.integers(0, 255, (16, 45, 37, 3), dtype=np.uint8), np.arange(16) % 2,
                                    ("a", "b"))
    result = ShortcutDetector(DetectorConfig(progress=False, num_selected=4, knn_samples=8)).fit(
        adapter, data, run_dir=tmp_path / "run")
    # Exported from the run folder, as `edgeshort export RUN` does: the reloaded run keeps it too. (A random
    # model on 16 noise images has no shortcut to find; what is exported here is its preprocessing.)
    bundle = export_bundle(tmp_path / "run", tmp_path / "bundle",
                           ExportOptions(formats=("onnx",), progress=False, ignore_verdict=True), calibration=data)
    assert bundle.manifest["model"]["preprocessing"]["interpolation"] == "bicubic"
    assert bundle.manifest["model"]["preprocessing"]["crop_pct"] == 0.8
    assert bundle.manifest["format"] == 2  # a format-1 runtime would stretch instead of cropping, so it must refuse
    files = []
    for i in range(len(data)):
        files.append(tmp_path / f"{i}.png")
        data.image(i).save(files[-1])
    edge = Guard.load(tmp_path / "bundle", backend="onnxruntime").predict(files)
    torch_logits = result.predict(data, progress=False).logits
    np.testing.assert_allclose(np.stack([r.logits for r in edge]), torch_logits, atol=1e-4)
    # The overlay draws the flag grid over the square the model saw, not over the whole 37x45 image.
    from edgeshort.commands.predict import OverlayWriter

    writer = OverlayWriter(tmp_path / "overlays", bundle.preprocessing)
    overlay = Image.open(writer.write(str(files[0]), writer.picture(data.image(0)), edge[0]))
    assert abs(overlay.width / overlay.height - 1) < 0.05  # the whole image is 37/45 = 0.82 (to the pixel)


def _fitted_and_exported(model, images, labels, config, out):
    """Fit on preprocessed tensors, export on both backends calibrated on all of them; parity must pass."""
    from edgeshort.detect import ShortcutDetector

    names = [f"class {c}" for c in range(int(labels.max()) + 1)]
    result = ShortcutDetector(config).fit(model, (images, labels), class_names=names)
    # A random model learned no shortcut, and its run says so: exported anyway, as the mechanics are tested.
    bundle = export_bundle(result, out, ExportOptions(progress=False, calibration_size=len(images), ignore_verdict=True),
                           calibration=(images, labels))
    parity = bundle.manifest["parity"]
    assert parity["passed"] and set(parity["backends"]) == {"onnxruntime", "openvino"}
    return result, bundle, parity


def test_vit_b_16_bundle_matches_torch(tmp_path):
    """The seed's architecture: ORT and OpenVINO f32 match torch within 1e-4 (plain and masked, batch 1 and 3)."""
    from torchvision.models import vit_b_16

    from edgeshort.detect import DetectorConfig

    torch.manual_seed(0)
    model = vit_b_16(weights=None, num_classes=2).eval()
    with torch.no_grad():
        model.heads.head.weight.normal_(0, 0.02)
    images = torch.randn(6, 3, 224, 224)
    labels = torch.tensor([0, 1] * 3)
    config = DetectorConfig(num_selected=3, knn_samples=60, progress=False, batch_size=3, min_patches=1)
    result, bundle, parity = _fitted_and_exported(model, images, labels, config, tmp_path / "vit")
    for graphs in parity["backends"].values():
        assert graphs["plain"]["logits_max_abs_diff"] <= TOLERANCE
        assert graphs["encoder_head"]["logits_max_abs_diff"] <= TOLERANCE  # masked inputs
        assert graphs["guarded"]["flags_mismatches"] == 0
    assert bundle.manifest["knn_cross_check"]["mismatches_vs_sklearn"] == 0
    assert bundle.grid == (14, 14)


def _timm_family(**kw):
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3, **kw)


def _timm_distilled_family():
    from timm.models.deit import VisionTransformerDistilled

    return VisionTransformerDistilled(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3)


def _transformers_family():
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                               num_attention_heads=2, intermediate_size=64, num_labels=3))


@pytest.mark.parametrize("build", [_timm_family, lambda: _timm_family(reg_tokens=2), _timm_distilled_family,
                                   _transformers_family], ids=["timm", "timm-registers", "deit-distilled",
                                                               "transformers"])
def test_every_family_exports_a_bundle_that_matches_torch(build, tmp_path):
    """Each adapter family's graphs (plain, guarded, split) export and agree with torch on both backends."""
    pytest.importorskip("timm")
    pytest.importorskip("transformers")
    from edgeshort.detect import DetectorConfig

    torch.manual_seed(0)
    model = build().eval()
    images, labels = torch.rand(12, 3, 32, 32) * 2 - 1, torch.arange(12) % 3  # normalised with mean = std = 0.5
    config = DetectorConfig(num_selected=3, knn_samples=12, progress=False, min_patches=1, dfr="none")
    result, bundle, parity = _fitted_and_exported(model, images, labels, config, tmp_path / "bundle")
    for graphs in parity["backends"].values():
        assert set(graphs) == {"guarded", "plain", "embed", "guard", "encoder_head"}
        for graph, figures in graphs.items():
            for key, value in figures.items():
                assert value <= (0 if key.endswith("_mismatches") else TOLERANCE), (graph, key, value)
    from edgeshort.runtime import Guard

    edge = Guard.load(tmp_path / "bundle", backend="onnxruntime").predict(list(images.numpy()))  # preprocessed
    with torch.no_grad():
        np.testing.assert_allclose(np.stack([r.logits for r in edge]), result.adapter.forward_tokens(result.adapter.embed(images)).numpy(),
                                   atol=TOLERANCE)


@pytest.mark.slow
def test_fp16_weights_and_int8_graph_report_what_they_cost(demo_result, demo_data, demo_bundle, tmp_path,
                                                            monkeypatch, capsys, caplog):
    capsys.readouterr()
    bundle = export_bundle(demo_result, tmp_path / "small", ExportOptions(weights="fp16", int8=True, progress=False),
                           calibration=demo_data["val"])
    assert "Statistics collection" not in "".join(capsys.readouterr())  # nncf's bars are quiet too
    manifest = bundle.manifest
    assert manifest["openvino"]["weights"] == "fp16"
    # The FP16 graphs auto picks on Intel are checked against torch, within their own, recorded limits.
    openvino = manifest["parity"]["backends"]["openvino"]
    assert manifest["parity"]["openvino_fp16_limits"]["tolerance"] >= openvino["plain"]["logits_max_abs_diff"] > 0
    f32_bin = demo_bundle.manifest["files"]["plain.bin"]["bytes"]
    assert manifest["files"]["plain.bin"]["bytes"] < 0.6 * f32_bin
    int8 = manifest["openvino"]["int8"]
    assert int8["graphs"] == ["guarded_int8", "plain_int8"] and int8["calibration_size"] == 300
    # Checked on validation images nncf never saw, against the f32 ONNX graphs (the IR here has FP16
    # weights), on the label the bundle acts on.
    assert int8["check_held_out"] and int8["check_size"] == 500 and int8["reference"] == "the f32 ONNX graphs"
    assert int8["final_label_agreement"] >= 0.95 and int8["flag_agreement"] >= 0.95
    assert int8["plain_label_agreement"] >= 0.95 and int8["present_agreement"] >= 0.95
    assert int8["label_changed_agreement"] >= 0.95
    assert (int8["warning"] is None) == (min(int8["final_label_agreement"], int8["present_agreement"]) >= 0.99)
    # The guard (patch embedding, key projection, key-KNN) stays f32: nothing it computes from is quantised,
    # so INT8 finds the shortcut on the same images as f32.
    import openvino as ov

    from edgeshort.export.quantize import guard_operations

    guarded_int8 = ov.Core().read_model(str(bundle.path("guarded_int8", "openvino")))
    guard_ops = set(guard_operations(guarded_int8, {"flags", "raw_flags", "present", "saliency"}))
    kinds = {op.get_friendly_name(): op.get_type_name() for op in guarded_int8.get_ops()}
    assert {"MatMul", "TopK", "Convolution"} <= {kinds[name] for name in guard_ops}
    assert "FakeQuantize" not in {kinds[name] for name in guard_ops}
    assert "FakeQuantize" in kinds.values() and int8["present_agreement"] == 1.0
    # FP16 graphs off torch by more than their limit are refused, with the way out.
    from edgeshort.export import exporter

    monkeypatch.setattr(exporter, "FP16_TOLERANCE", 0.0)
    with pytest.raises(ParityError, match=r"openvino/.*logits_max_abs_diff[\s\S]*export with --weights f32"):
        export_bundle(demo_result, tmp_path / "strict", ExportOptions(weights="fp16", progress=False, tolerance=1e-9,
                                                                      skl2onnx_check=False), calibration=demo_data["val"])
    assert not (tmp_path / "strict").exists()
    # The runtime runs the INT8 guarded graph on request, and says when it cannot.
    from edgeshort.runtime import Guard

    test = np.stack([demo_data["test"].array(i) for i in range(0, 800, 20)])
    int8_guard = Guard.load(bundle, precision="int8")
    assert int8_guard.info.precision == "int8" and int8_guard.info.backend == "openvino"
    f32_labels = [r.final_label for r in Guard.load(bundle, backend="openvino").predict(test)]
    int8_results = int8_guard.predict(test)
    agree = np.mean([r.final_label for r in int8_results] == np.array(f32_labels))
    assert agree >= 0.9
    # The plain prediction is INT8 too: the INT8 plain graph's where something was masked, and where nothing
    # was the INT8 guarded graph's, which then is the plain model (so the guard changes no label there).
    plain = open_session(bundle.path("plain_int8", "openvino"), "openvino").run(
        {"images": int8_guard.preprocess(test)})["logits"]
    flagged = np.array([r.shortcut_present for r in int8_results])
    assert flagged.any() and not flagged.all()
    np.testing.assert_allclose(np.stack([r.logits for r in int8_results])[flagged], plain[flagged], atol=1e-5)
    assert all(np.array_equal(r.logits, r.ablated_logits) for r in int8_results if not r.shortcut_present)
    # An INT8 bundle's warning is logged where it is run.
    warned = tmp_path / "warned"
    shutil.copytree(bundle.root, warned)
    edited = json.loads((warned / "manifest.json").read_text())
    edited["openvino"]["int8"]["warning"] = "INT8 changes the final label of 9 of 500 held-out images (1.8%)"
    write_manifest(warned, edited)
    with caplog.at_level(logging.WARNING, logger="edgeshort"):
        Guard.load(warned, backend="openvino")
        assert "INT8 changes" not in caplog.text  # f32 runs no INT8 graph
        Guard.load(warned, precision="int8")
    assert "INT8 changes the final label of 9 of 500 held-out images" in caplog.text
    # A bundle exported before plain_int8 existed runs its plain graph in f32, and bench says so.
    older = tmp_path / "older-int8"
    shutil.copytree(bundle.root, older)
    edited = json.loads((older / "manifest.json").read_text())
    del edited["graphs"]["plain_int8"]
    write_manifest(older, edited)
    old_results = Guard.load(older, precision="int8").predict(test)
    f32_plain = open_session(bundle.path("plain", "openvino"), "openvino").run(
        {"images": int8_guard.preprocess(test)})["logits"]
    flagged_old = np.array([r.shortcut_present for r in old_results])
    np.testing.assert_allclose(np.stack([r.logits for r in old_results])[flagged_old], f32_plain[flagged_old],
                               atol=1e-5)
    from edgeshort.bench import bench_bundle

    old_row = next(c for c in bench_bundle(older, backends=["openvino"], batches=(1,), rounds=1, block=1,
                                           seed_pipeline=False, progress=False)["cases"] if c["precision"] == "int8")
    assert "plain (f32)" in old_row["timings"]
    with pytest.raises(BundleError, match="has no INT8 graph; export it with .* --int8"):
        Guard.load(demo_bundle, precision="int8")
    with pytest.raises(InputError, match="the INT8 graph is OpenVINO IR"):
        Guard.load(bundle, backend="onnxruntime", precision="int8")
    session = open_session(bundle.path("guarded_int8", "openvino"), "openvino")
    images = np.stack([x for _, b in demo_data["test"].subset(np.arange(8)).batches(bundle.preprocessing, 8) for x in b])
    assert session.run({"images": images})["ablated_logits"].shape == (8, 2)
    # bench times the INT8 guarded graph against the INT8 plain one.
    timed = bench_bundle(bundle.root, backends=["openvino"], batches=(1,), rounds=1, block=1, seed_pipeline=False,
                         progress=False)
    int8_row = next(c for c in timed["cases"] if c["precision"] == "int8")
    assert {"plain", "guarded"} <= set(int8_row["timings"]) and int8_row["ratio_vs_plain"]["plain"] == 1.0
    # ... and, for whether INT8 pays off here, against f32's guarded graph in one interleaved block.
    from edgeshort.bench import markdown_table

    (side_by_side,) = timed["precision_cases"]
    assert side_by_side["batch"] == 1 and {"f32", "int8"} <= set(side_by_side["timings"])
    assert side_by_side["ratio_vs_f32"]["f32"] == 1.0 and side_by_side["ratio_vs_f32"]["int8"] > 0
    assert "| 1 | int8 |" in markdown_table(timed).split("timed side by side (ratio under 1: faster than f32)")[1]


def test_detection_warnings_travel_with_the_bundle_to_the_edge(demo_bundle, tmp_path, caplog):
    from edgeshort.runtime import Guard

    copy = tmp_path / "bundle"
    shutil.copytree(demo_bundle.root, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["guard"]["warnings"] = ["ablating the flagged tokens lowers balanced validation accuracy"]
    write_manifest(copy, manifest)
    with caplog.at_level("WARNING", logger="edgeshort.runtime.guard"):
        Guard.load(copy, backend="onnxruntime")
    assert "its detection run warned: ablating the flagged tokens lowers" in caplog.text


def test_no_dfr_bundle_acts_on_the_ablated_prediction(demo_result, demo_data, tmp_path, capsys):
    from dataclasses import replace

    from edgeshort.cli import main
    from edgeshort.runtime import Guard

    # A run whose test set condemned its DFR head, as a user's may.
    condemned = "the DFR head lowers worst-group accuracy on this test set (...)"
    run = tmp_path / "run"
    shutil.copytree(demo_result.run_dir, run)
    metrics = json.loads((run / "metrics.json").read_text())
    few = "DFR balanced its (class, shortcut found / not found) groups at 4 validation images each (...)"
    (run / "metrics.json").write_text(json.dumps({**metrics, "dfr_warning": condemned, "dfr_fit_warnings": [few],
                                                  "warnings": [*metrics["warnings"], few]}))

    # Into a folder that does not exist yet, as a deployment path often is, calibrated on a plain folder
    # of images (no class folders: parity needs only pixels).
    out = tmp_path / "deploy" / "ablated"
    calibration = tmp_path / "calibration"
    calibration.mkdir()
    for i in range(6):
        Image.fromarray(demo_data["test"].array(i)).save(calibration / f"{i}.png")
    assert main(["export", str(run), "-o", str(out), "--formats", "onnx", "--no-dfr",
                 "--data", str(calibration)]) == 0
    printed = capsys.readouterr().out
    assert "final label: ablated prediction (the run's DFR head left out by --no-dfr)" in printed
    # Each step says what runs before it runs: a large model's graph takes minutes.
    import re

    assert re.search(r"  exporting guarded +\.\.\. [\d.]+ s\n", printed), printed
    assert re.search(r"  checking every graph against torch on 6 images \.\.\. [\d.]+ s\n", printed), printed
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask  # readable by a service running as another user
    assert not [p for p in out.parent.iterdir() if p.name != "ablated"]  # no staging folder left behind
    bundle = load_bundle(out)
    assert bundle.manifest["parity"]["calibration_size"] == 6
    assert bundle.manifest["guard"]["has_dfr"] is False and bundle.manifest["guard"]["dfr_omitted"] is True
    assert condemned not in bundle.manifest["guard"]["warnings"]  # the advice was taken
    assert few not in bundle.manifest["guard"]["warnings"]  # a head fitted on few images is not shipped
    assert "dfr_logits" not in bundle.manifest["graphs"]["guarded"]["outputs"]
    test = demo_data["test"].subset(np.arange(0, 800, 10))
    results = Guard.load(bundle, backend="onnxruntime").predict([test.image(i) for i in range(len(test))])
    reference = demo_result.predict(test)
    assert all(r.dfr_label is None for r in results)
    assert [r.final_label for r in results] == [r.ablated_label for r in results] == reference.labels("ablated").tolist()
    assert sum(r.label_changed for r in results) == int((reference.labels("ablated") != reference.labels("original")).sum()) > 0

    # Shipped anyway, the head takes the test set's verdict with it.
    shipped = export_bundle(replace(demo_result, metrics={**demo_result.metrics, "dfr_warning": condemned}),
                            tmp_path / "dfr", ExportOptions(formats=("onnx",), progress=False, skl2onnx_check=False),
                            calibration=calibration)  # in Python too, a plain folder of images calibrates
    assert shipped.manifest["parity"]["calibration_size"] == 6
    assert shipped.manifest["guard"]["has_dfr"] is True and shipped.manifest["guard"]["dfr_omitted"] is False
    assert condemned in shipped.manifest["guard"]["warnings"]


def test_force_replaces_only_a_bundle(demo_result, tmp_path):
    run_copy = tmp_path / "run"
    shutil.copytree(demo_result.run_dir, run_copy)
    before = sorted(p.name for p in run_copy.iterdir())
    with pytest.raises(BundleError, match="no manifest.json, so it is not a bundle"):
        export_bundle(demo_result, run_copy, ExportOptions(progress=False), overwrite=True)
    with pytest.raises(BundleError, match="exists and is not empty"):
        export_bundle(demo_result, run_copy, ExportOptions(progress=False))
    (tmp_path / "file").write_text("x")
    with pytest.raises(BundleError, match="is a file"):
        export_bundle(demo_result, tmp_path / "file", ExportOptions(progress=False))
    assert sorted(p.name for p in run_copy.iterdir()) == before


def _onnx_bytes(manifest: dict) -> int:
    return sum(entry["bytes"] for name, entry in manifest["files"].items() if name.endswith((".onnx", ".onnx.data")))


def test_a_bundle_of_one_path_is_smaller_and_runs_that_path(demo_result, demo_data, demo_bundle, tmp_path):
    from edgeshort.bench import bench_bundle
    from edgeshort.runtime import Guard

    images = np.stack([demo_data["test"].array(i) for i in range(0, 800, 40)])
    expected = Guard.load(demo_bundle, backend="onnxruntime").predict(images)
    sizes = {}
    for graphs, kept in (("fused", {"guarded", "plain"}), ("split", {"embed", "guard", "encoder_head"})):
        bundle = export_bundle(demo_result, tmp_path / graphs, ExportOptions(formats=("onnx",), graphs=graphs,
                                                                             progress=False),
                               calibration=demo_data["val"])
        assert set(bundle.manifest["graphs"]) == kept
        sizes[graphs] = _onnx_bytes(bundle.manifest)
        guard = Guard.load(bundle, backend="onnxruntime")
        assert set(guard.info.compiled) == kept
        results = guard.predict(images)  # the path the bundle has
        assert [r.final_label for r in results] == [r.final_label for r in expected]
        assert [r.flagged_patches for r in results] == [r.flagged_patches for r in expected]
        np.testing.assert_allclose([r.logits for r in results], [r.logits for r in expected], atol=1e-4)
        other = "split" if graphs == "fused" else "fused"
        with pytest.raises(BundleError, match=f"path='{other}' needs the graphs .* --graphs all"):
            guard.predict(images[:1], path=other)
    # Every ONNX set holds the encoder's weights once (one shared file); one path has fewer graphs to describe.
    assert max(sizes.values()) < _onnx_bytes(demo_bundle.manifest)
    # Older runtimes expect the fused graphs: a bundle without them says it needs a newer one.
    assert load_bundle(tmp_path / "split").manifest["format"] == 3
    assert load_bundle(tmp_path / "fused").manifest["format"] < 3
    # bench times a split bundle through its own graphs: the plain pass is embed + encoder_head.
    bench = bench_bundle(tmp_path / "split", backends=["onnxruntime"], batches=(2,), rounds=1, block=1,
                         seed_pipeline=False, progress=False)
    assert [case.get("map_weights", False) for case in bench["cases"]] == [False, True]  # ONNX Runtime both ways
    for case in bench["cases"]:
        assert {"plain", "guarded", "guarded+original (flagged image)",
                "Guard.predict (clean image)"} <= set(case["timings"])
        assert case["clean_inputs_flagged"] == 0.0 and case["cold_start_s"]["guarded"] > 0
    with pytest.raises(InputError, match="INT8 quantises the fused guarded and plain graphs"):
        ExportOptions(graphs="split", int8=True)


def test_a_runs_dfr_fit_warnings_are_read_under_either_key():
    """Runs saved before the list held one warning under `dfr_fit_warning`; a --no-dfr bundle leaves it out too."""
    from edgeshort.export.exporter import _dfr_fit_warnings

    assert _dfr_fit_warnings({"dfr_fit_warnings": ["a", "b"]}) == ["a", "b"]
    assert _dfr_fit_warnings({"dfr_fit_warning": "a"}) == ["a"]
    assert _dfr_fit_warnings({"dfr_fit_warning": None}) == [] == _dfr_fit_warnings({})
