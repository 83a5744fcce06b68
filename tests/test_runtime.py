"""The torch-free runtime: parity with the offline detector on both backends, fused vs split paths,
preprocessing parity with torchvision, actionable errors, thread safety, flat memory and fuzzing.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgeshort.errors import (
    BundleError,
    EdgeshortError,
    ImageLoadError,
    InputError,
    MissingDependencyError,
)
from edgeshort.runtime import Guard, GuardResult
from edgeshort.runtime import bundle as bundle_module
from edgeshort.runtime.bundle import write_manifest
from edgeshort.runtime.preprocess import Preprocessing, load_image, preprocess_image

BACKENDS = ["onnxruntime", "openvino"]
# Logits of two backends on the same graph agree to float rounding; labels and flags exactly.
LOGIT_ATOL = 1e-3


# -- fixtures -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def test_images(demo_data) -> np.ndarray:
    """The demo's test split as uint8 (N, H, W, 3)."""
    test = demo_data["test"]
    return np.stack([test.array(i) for i in range(len(test))])


@pytest.fixture(scope="module")
def reference(demo_result, demo_data):
    """The offline (torch) detector's predictions on the test split."""
    return demo_result.predict(demo_data["test"], progress=False)


@pytest.fixture(scope="module")
def guards(demo_bundle) -> dict[str, Guard]:
    return {backend: Guard.load(demo_bundle, backend=backend) for backend in BACKENDS}


@pytest.fixture(scope="module")
def mixed_indices(reference) -> np.ndarray:
    """A few test images with a shortcut present and a few without, interleaved."""
    present, clean = np.flatnonzero(reference.present), np.flatnonzero(~reference.present)
    assert len(present) >= 4 and len(clean) >= 4, "the demo test split should have both kinds"
    return np.stack([present[:12], clean[:12]], axis=1).reshape(-1)


def stacked(results: list[GuardResult], name: str) -> np.ndarray:
    return np.stack([np.asarray(getattr(r, name)) for r in results])


def assert_same_results(a: list[GuardResult], b: list[GuardResult], atol: float = 0.0) -> None:
    for name in ("label", "ablated_label", "dfr_label", "shortcut_present"):
        assert [getattr(r, name) for r in a] == [getattr(r, name) for r in b], name
    for name in ("flags", "raw_flags"):
        np.testing.assert_array_equal(stacked(a, name), stacked(b, name), err_msg=name)
    names = ["logits", "ablated_logits", "saliency"] + (["dfr_logits"] if a[0].dfr_logits is not None else [])
    for name in names:
        np.testing.assert_allclose(stacked(a, name), stacked(b, name), atol=atol, rtol=0, err_msg=name)


def copy_bundle(bundle, tmp_path: Path) -> Path:
    target = tmp_path / "bundle"
    shutil.copytree(bundle.root, target)
    return target


def rewrite_manifest(root: Path, change) -> None:
    path = root / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


# -- parity with the offline detector ---------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_path_matches_offline_detector(guards, backend, test_images, reference):
    results = guards[backend].predict(test_images, batch_size=32)
    assert len(results) == len(test_images)
    assert [r.label for r in results] == reference.labels("original").tolist()
    assert [r.ablated_label for r in results] == reference.labels("ablated").tolist()
    if reference.dfr_logits is not None:
        assert [r.dfr_label for r in results] == reference.labels("dfr").tolist()
    np.testing.assert_array_equal(stacked(results, "flags"), reference.flags)
    np.testing.assert_array_equal(stacked(results, "raw_flags"), reference.raw_flags)
    np.testing.assert_array_equal(stacked(results, "shortcut_present"), reference.present)
    np.testing.assert_allclose(stacked(results, "logits"), reference.logits, atol=LOGIT_ATOL, rtol=0)
    np.testing.assert_allclose(stacked(results, "ablated_logits"), reference.ablated_logits, atol=LOGIT_ATOL, rtol=0)
    np.testing.assert_allclose(stacked(results, "saliency"), reference.saliency, atol=1e-3, rtol=0)
    assert reference.present.any() and (~reference.present).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_split_path_equals_fused_path(guards, backend, test_images, mixed_indices):
    guard = guards[backend]
    images = test_images[mixed_indices]
    fused = guard.predict(images, batch_size=8)
    assert_same_results(guard.predict(images, batch_size=8, path="split"), fused, atol=1e-4)
    # Dropping the flagged tokens must equal masking them out of attention.
    assert_same_results(guard.predict(images, batch_size=1, path="split", drop_tokens=True), fused, atol=1e-4)
    assert_same_results(guard.predict(images, batch_size=5, path="split", drop_tokens=True), fused, atol=1e-4)


def test_mapped_weights_give_the_same_results(guards, demo_bundle, test_images, mixed_indices, tmp_path, caplog):
    images = test_images[mixed_indices]
    mapped = Guard.load(demo_bundle, backend="onnxruntime", map_weights=True)
    assert mapped.info.map_weights
    # Without prepacking ONNX Runtime takes other matrix kernels: the same answers, logits within rounding.
    assert_same_results(mapped.predict(images, batch_size=8), guards["onnxruntime"].predict(images, batch_size=8),
                        atol=1e-5)
    assert_same_results(mapped.predict(images, path="split"), guards["onnxruntime"].predict(images, path="split"),
                        atol=1e-5)
    with caplog.at_level("WARNING"):
        assert not Guard.load(demo_bundle, backend="openvino", map_weights=True).info.map_weights
    assert "map_weights is not used: it applies to ONNX Runtime" in caplog.text
    # A bundle whose ONNX graphs hold their own weights has no shared file to map.
    root = copy_bundle(demo_bundle, tmp_path)
    manifest = json.loads((root / "manifest.json").read_text())
    for entry in manifest["graphs"].values():
        entry.pop("onnx_external_data", None)
    write_manifest(root, manifest)
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert not Guard.load(root, backend="onnxruntime", map_weights=True).info.map_weights
    assert "hold their own weights (an older export)" in caplog.text


def test_plain_logits_need_no_second_pass_for_clean_images(guards, test_images, reference):
    clean = np.flatnonzero(~reference.present)[:8]
    for result in guards["onnxruntime"].predict(test_images[clean]):
        assert not result.shortcut_present
        np.testing.assert_array_equal(result.logits, result.ablated_logits)


def test_every_input_kind_gives_the_same_answer(guards, demo_bundle, test_images, tmp_path):
    guard = guards["onnxruntime"]
    image = test_images[0]
    path = tmp_path / "one.png"
    Image.fromarray(image).save(path)
    tensor = guard.preprocess(image)[0]
    single = [
        guard.predict(str(path)), guard.predict(path), guard.predict(Image.open(path)), guard.predict(image),
        guard.predict(tensor),
    ]
    batched = [guard.predict([image])[0], guard.predict(tensor[None])[0], guard.predict(image[None])[0]]
    for result in single + batched:
        assert isinstance(result, GuardResult)
        assert_same_results([result], [single[-1]])
    assert single[0].source == str(path)
    record = json.loads(json.dumps(single[0].to_dict()))
    assert record["class_name"] == guard.class_names[record["label"]]
    assert len(record["logits"]) == len(guard.class_names)
    assert np.asarray(record["flags"]).shape == tuple(demo_bundle.grid)
    with pytest.raises(ValueError):
        single[0].logits[0] = 1.0  # results are frozen, arrays included
    assert guard.predict([]) == []


def test_load_records_backend_and_precision(guards, demo_bundle):
    from edgeshort.runtime import choose_backend

    for backend, guard in guards.items():
        assert guard.info.backend == backend
        assert guard.info.precision == "f32"
        assert guard.info.load_seconds > 0 and guard.info.warmup_seconds > 0
        assert set(guard.info.compiled) >= {"guarded", "plain"}
        json.dumps(guard.info.to_dict())
    auto = Guard.load(demo_bundle)
    assert auto.info.backend == choose_backend("auto")


def test_openvino_runs_f32_behind_virtual_devices_too(guards, demo_bundle, test_images):
    # Unasked, OpenVINO would run bf16 behind "AUTO:CPU" on CPUs that have it, while the records said f32.
    import openvino as ov

    if "BF16" not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        pytest.skip("this CPU has no bf16: f32 is all OpenVINO could run here")
    f32 = stacked(guards["openvino"].predict(test_images[:16]), "logits")
    for device in ("AUTO:CPU", "MULTI:CPU", "HETERO:CPU"):
        guard = Guard.load(demo_bundle, backend="openvino", device=device)
        assert guard.info.precision == "f32"
        np.testing.assert_array_equal(stacked(guard.predict(test_images[:16]), "logits"), f32)


def test_auto_backend_follows_the_bundle_and_the_device(demo_bundle, tmp_path, monkeypatch):
    from edgeshort.runtime import backends

    monkeypatch.setattr(backends, "is_intel_cpu", lambda: True)
    assert backends.choose_backend("auto") == "openvino"
    assert backends.choose_backend("auto", device="CPU") == "openvino"
    for device in ("cpu", "cuda", "coreml"):
        assert backends.choose_backend("auto", device=device) == "onnxruntime"
    # An ONNX-only bundle on an Intel CPU with OpenVINO installed runs on ONNX Runtime.
    onnx_only = tmp_path / "onnx-only"
    shutil.copytree(demo_bundle.root, onnx_only)
    manifest = json.loads((onnx_only / "manifest.json").read_text())
    for graph in manifest["graphs"].values():
        graph["files"].pop("openvino")
    for name in [n for n in manifest["files"] if n.endswith((".xml", ".bin"))]:
        del manifest["files"][name]
        (onnx_only / name).unlink()
    write_manifest(onnx_only, manifest)
    assert Guard.load(onnx_only).info.backend == "onnxruntime"
    with pytest.raises(InputError, match="has no OpenVINO IR, and only OpenVINO runs bf16.*--formats onnx,openvino"):
        Guard.load(onnx_only, precision="bf16")
    assert Guard.load(demo_bundle, device="cpu").info.backend == "onnxruntime"
    # OpenVINO's own device names choose it on any CPU; its "CPU" may be spelt in lower case.
    monkeypatch.setattr(backends, "is_intel_cpu", lambda: False)
    assert backends.choose_backend("auto") == "onnxruntime"
    assert Guard.load(demo_bundle, precision="bf16").info.backend == "openvino"  # bf16 on any CPU that has it
    with pytest.raises(InputError, match="bf16 runs on OpenVINO only, and 'cuda' is an ONNX Runtime device"):
        Guard.load(demo_bundle, precision="bf16", device="cuda")
    for device in ("AUTO", "NPU", "HETERO:GPU,CPU"):
        assert backends.choose_backend("auto", device=device) == "openvino"
    assert Guard.load(demo_bundle, backend="openvino", device="cpu").info.device == "CPU"
    # An OpenVINO device names what is missing, not an ONNX Runtime device list or CUDA.
    with pytest.raises(BundleError, match="OpenVINO IR for the OpenVINO device 'NPU', got one with ONNX only"):
        backends.choose_backend("auto", formats=("onnx",), device="NPU")
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():  # lower-case "gpu" is CUDA's
        with pytest.raises(InputError, match=r"for an Intel GPU, run OpenVINO: backend 'openvino' with device 'GPU'"):
            Guard.load(demo_bundle, backend="onnxruntime", device="gpu")
    real_import = backends.importlib.import_module
    monkeypatch.setattr(backends.importlib, "import_module",
                        lambda name: (_ for _ in ()).throw(ModuleNotFoundError(name=name)) if name == "openvino"
                        else real_import(name))
    for device in ("GPU", "NPU", "AUTO"):
        with pytest.raises(MissingDependencyError, match=f"'{device}' is an OpenVINO device, and OpenVINO is not "
                                                         r"installed; install it with: pip install 'edgeshort\[openvino\]'"):
            backends.choose_backend("auto", device=device)


def test_openvino_device_names_are_checked_inside_virtual_devices(demo_bundle):
    from edgeshort.runtime.backends import choose_backend, unknown_openvino_devices

    available = ["CPU", "GPU.0", "GPU.1"]
    for known in ("CPU", "GPU", "GPU.1", "AUTO", "AUTO:GPU,-CPU", "HETERO:GPU.1,CPU", "MULTI:CPU(4),GPU(2)"):
        assert unknown_openvino_devices(known, available) == [], known
    assert unknown_openvino_devices("AUTO:CPUX", available) == ["CPUX"]
    assert unknown_openvino_devices("HETERO:NPU,CPU", available) == ["NPU"]
    assert unknown_openvino_devices("GPU.2", available) == ["GPU.2"]
    assert unknown_openvino_devices("GPU.0", ["CPU", "GPU"]) == [] and unknown_openvino_devices("GPU.1", ["GPU"]) == ["GPU.1"]
    # A typo behind a virtual device gets edgeshort's device list, not OpenVINO's compile error on the graph.
    with pytest.raises(InputError, match=r"got 'AUTO:CPUX': CPUX is not on this machine; `edgeshort env` lists"):
        Guard.load(demo_bundle, backend="openvino", device="auto:cpux")
    assert choose_backend("auto", device="GPU.1") == "openvino"


def test_openvino_compiles_into_the_cache_dir(demo_bundle, test_images, guards, tmp_path, caplog):
    cached = Guard.load(demo_bundle, backend="openvino", cache_dir=tmp_path / "ov-cache")
    assert any((tmp_path / "ov-cache").iterdir()), "OpenVINO wrote no compiled blobs"
    assert_same_results(cached.predict(test_images[:4]), guards["openvino"].predict(test_images[:4]))
    with caplog.at_level(logging.WARNING, logger="edgeshort"):
        Guard.load(demo_bundle, backend="onnxruntime", cache_dir=tmp_path / "ort-cache")
    assert "cache_dir" in caplog.text and "ONNX Runtime (the backend chosen) keeps no compiled graphs" in caplog.text


def test_runtime_imports_no_torch_sklearn_scipy_or_onnx(demo_bundle, test_images, reference, tmp_path,
                                                        import_blocker):
    np.save(tmp_path / "images.npy", test_images[:16])
    blocked = {"torch", "torchvision", "sklearn", "scipy", "onnx", "onnxscript", "skl2onnx"}
    script = import_blocker(blocked) + textwrap.dedent(
        """
        import json
        import numpy as np
        import edgeshort
        import edgeshort.runtime

        images = np.load(sys.argv[2])
        out = {}
        for backend in ("onnxruntime", "openvino"):
            guard = edgeshort.Guard.load(sys.argv[1], backend=backend)
            out[backend] = [[r.label, r.ablated_label] for r in guard.predict(images)]
        out["leaked"] = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        print(json.dumps(out))
        """
    )
    proc = subprocess.run([sys.executable, "-c", script, str(demo_bundle.root), str(tmp_path / "images.npy")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["leaked"] == []
    expected = np.stack([reference.labels("original")[:16], reference.labels("ablated")[:16]], axis=1).tolist()
    assert out["onnxruntime"] == expected and out["openvino"] == expected


# -- preprocessing parity with torchvision ------------------------------------------------------
def _smooth_image(mode: str, size=(53, 41), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (6, 5, 4), dtype=np.uint8)
    pixels = np.asarray(Image.fromarray(coarse, "RGBA").resize(size, Image.Resampling.BICUBIC))
    noisy = np.clip(pixels.astype(int) + rng.integers(-20, 21, pixels.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(noisy, "RGBA").convert(mode)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("fmt,mode", [("png", "RGB"), ("png", "L"), ("png", "RGBA"), ("jpeg", "RGB"), ("jpeg", "L")])
def test_preprocessing_matches_torchvision(tmp_path, fmt, mode, interpolation):
    torch = pytest.importorskip("torch")
    transforms = pytest.importorskip("torchvision.transforms")
    path = tmp_path / f"image.{fmt}"
    _smooth_image(mode).save(path)
    prep = Preprocessing(size=(32, 48), mean=(0.5, 0.45, 0.4), std=(0.25, 0.2, 0.22), interpolation=interpolation)
    ours = preprocess_image(load_image(path), prep)
    mode_enum = getattr(transforms.InterpolationMode, interpolation.upper())
    pipeline = transforms.Compose([
        transforms.Resize(prep.size, interpolation=mode_enum), transforms.ToTensor(),
        transforms.Normalize(prep.mean, prep.std),
    ])
    with Image.open(path) as img:
        theirs = pipeline(img.convert("RGB"))
    assert isinstance(theirs, torch.Tensor) and ours.shape == tuple(theirs.shape) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("image_size", [(53, 41), (41, 67), (50, 50)])
def test_centre_crop_matches_torchvision_and_timm(image_size, interpolation):
    """Aspect-kept resize + centre crop, as torchvision's Resize(256)+CenterCrop(224) and timm's eval transform."""
    transforms = pytest.importorskip("torchvision.transforms")
    img = _smooth_image("RGB", size=image_size)
    mean, std = (0.5, 0.45, 0.4), (0.25, 0.2, 0.22)
    mode_enum = getattr(transforms.InterpolationMode, interpolation.upper())
    torchvision_eval = transforms.Compose([
        transforms.Resize(32, interpolation=mode_enum), transforms.CenterCrop(28), transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])
    prep = Preprocessing(size=(28, 28), mean=mean, std=std, interpolation=interpolation, crop_pct=0.875)
    np.testing.assert_allclose(preprocess_image(img, prep), torchvision_eval(img).numpy(), atol=1e-5, rtol=0)
    stretched = preprocess_image(img, Preprocessing(size=(28, 28), mean=mean, std=std, interpolation=interpolation))
    assert not np.allclose(preprocess_image(img, prep), stretched, atol=1e-2)

    create_transform = pytest.importorskip("timm.data").create_transform
    for size in ((24, 32), (32, 24), (28, 28)):  # a non-square input takes timm's keep-ratio resize
        for mode in ("center", "squash"):
            timm_eval = create_transform(input_size=(3, *size), crop_pct=0.9, crop_mode=mode,
                                         interpolation=interpolation, mean=mean, std=std)
            prep = Preprocessing(size=size, mean=mean, std=std, interpolation=interpolation, crop_pct=0.9,
                                 crop_mode=mode)
            np.testing.assert_allclose(preprocess_image(img, prep), timm_eval(img).numpy(), atol=1e-5, rtol=0)


def test_crop_box_is_the_part_the_model_sees():
    prep = Preprocessing(size=(224, 224), crop_pct=0.875)
    assert prep.crop_box(300, 200) == (62.5, 12.5, 237.5, 187.5)  # Resize(256): 384x256, crop at (80, 16)
    assert Preprocessing(size=(224, 224)).crop_box(300, 200) == (0.0, 0.0, 300.0, 200.0)
    wide = Image.new("RGB", (300, 200))
    assert all(abs(side - 175) <= 1 for side in prep.seen_part(wide).size)  # to the nearest pixel
    # squash stretches to 256x256 first: the crop keeps 87.5% of each side.
    assert Preprocessing(size=(224, 224), crop_pct=0.875, crop_mode="squash").crop_box(300, 200) == (
        18.75, 12.5, 281.25, 187.5)
    with pytest.raises(InputError, match=r"expected crop_mode in \('center', 'squash'\), got 'border'"):
        Preprocessing(size=(224, 224), crop_pct=0.9, crop_mode="border")


# -- errors a user can act on --------------------------------------------------------------------
def test_missing_and_corrupt_images_are_refused(guards, tmp_path):
    guard = guards["onnxruntime"]
    with pytest.raises(ImageLoadError, match="does not exist; check the path"):
        guard.predict(tmp_path / "nowhere.png")
    with pytest.raises(ImageLoadError, match=r"got the URL 'https://example.org/a.png'; images are read from files, "
                                             r"not downloaded"):
        guard.predict("https://example.org/a.png")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    with pytest.raises(ImageLoadError, match="cannot read image .*broken.png.*expected a valid PNG/JPEG"):
        guard.predict(str(broken))
    truncated = tmp_path / "truncated.png"
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:60])
    with pytest.raises(ImageLoadError, match="cannot read image"):
        guard.predict([truncated])
    with pytest.raises(ImageLoadError, match="expected an image file, got the folder"):
        guard.predict(tmp_path)
    with pytest.raises(ImageLoadError, match="expected an RGB, RGBA or grayscale image, got mode 'HSV'; convert it"):
        guard.predict(Image.new("HSV", (64, 64)))


def test_files_preprocess_on_threads_in_order_and_the_first_bad_file_is_named(guards, tmp_path):
    from edgeshort.runtime.preprocess import map_images

    guard = guards["onnxruntime"]
    files = []
    for i in range(6):
        files.append(tmp_path / f"photo{i}.png")
        _smooth_image("RGB", size=(300 + 10 * i, 280), seed=i).save(files[-1])
    serial = np.stack([preprocess_image(load_image(f), guard.preprocessing) for f in files])
    np.testing.assert_array_equal(guard.preprocess(files), serial)
    where = map_images(lambda i, item: threading.current_thread().name, files, workers=2)
    assert any(name.startswith("edgeshort-preprocess") for name in where)
    small = [np.zeros((64, 64, 3), np.uint8)] * 4  # cheaper on the calling thread than handed over
    assert set(map_images(lambda i, item: threading.current_thread().name, small, workers=2)) == {
        threading.current_thread().name}
    files[3].write_bytes(b"not an image")
    with pytest.raises(ImageLoadError, match="photo3.png"):
        guard.predict(files, batch_size=6)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_process_preprocesses_on_its_own_threads(tmp_path):
    """A pre-fork server warms up in the parent, then forks: the child must not wait on the parent's threads."""
    import multiprocessing

    from edgeshort.runtime.preprocess import map_images

    files = []
    for i in range(4):
        files.append(str(tmp_path / f"{i}.png"))
        _smooth_image("RGB", size=(300, 300), seed=i).save(files[-1])
    prep = Preprocessing(size=(32, 32))
    parent = np.stack(map_images(lambda i, path: preprocess_image(load_image(path), prep), files, workers=2))
    with multiprocessing.get_context("fork").Pool(1) as pool:
        child = pool.apply_async(_preprocess_in_child, (files,)).get(timeout=60)
    np.testing.assert_array_equal(child, parent)


def _preprocess_in_child(files):
    from edgeshort.runtime.preprocess import map_images

    prep = Preprocessing(size=(32, 32))
    return np.stack(map_images(lambda i, path: preprocess_image(load_image(path), prep), files, workers=2))


def test_high_bit_depth_images_are_refused_unless_they_hold_8_bit_values(guards, tmp_path):
    """A 16-bit radiograph would turn white in Pillow's RGB conversion; one holding 0..255 is read as 8-bit."""
    guard = guards["onnxruntime"]
    ramp = np.linspace(0, 1, 64 * 64).reshape(64, 64)
    xray = tmp_path / "xray16.png"
    Image.fromarray((ramp * 65535).astype(np.uint16)).save(xray)
    assert Image.open(xray).mode == "I;16"
    with pytest.raises(ImageLoadError, match=r"xray16.png.*values 0 to 65535; converting it to RGB would clip.*one fixed "
                                             r"factor for all, e.g. x \* 255 / 65535 for 16-bit.*not each by its own"):
        guard.predict(xray)
    with pytest.raises(ImageLoadError, match=r"float image with values 0 to 1; as RGB it would be almost black"):
        guard.predict(Image.fromarray(ramp.astype(np.float32)))
    low = tmp_path / "low16.png"
    Image.fromarray((ramp * 255).round().astype(np.uint16)).save(low)
    as_8bit = Image.fromarray((ramp * 255).round().astype(np.uint8))
    np.testing.assert_array_equal(guard.predict(low).logits, guard.predict(as_8bit).logits)
    # Big-endian 16-bit, as some TIFF writers store it: the same rules, not "not grayscale".
    big_endian = Image.frombytes("I;16B", (64, 64), (ramp * 65535).astype(">u2").tobytes())
    with pytest.raises(ImageLoadError, match=r"values 0 to 65535; converting it to RGB would clip"):
        guard.predict(big_endian)
    low_big_endian = Image.frombytes("I;16B", (64, 64), (ramp * 255).round().astype(">u2").tobytes())
    np.testing.assert_array_equal(guard.predict(low_big_endian).logits, guard.predict(as_8bit).logits)
    # One NaN pixel made Pillow's extrema NaN, and a 0..60000 float image passed as if in range.
    with_nan = (ramp * 60000).astype(np.float32)
    with_nan[0, 0] = np.nan
    Image.fromarray(with_nan).save(tmp_path / "nan.tif")
    with pytest.raises(ImageLoadError, match=r"nan.tif.* is a float image with NaN or infinite pixels"):
        guard.predict(tmp_path / "nan.tif")
    signed = Image.fromarray((ramp * 300 - 5).astype(np.int32))
    with pytest.raises(ImageLoadError, match=r"values -5 to 295; .*\(one fixed window for all \(e.g. a CT window\), mapped to 0..255, not each by its own"):
        guard.predict(signed)


def _png16(path, pixels: np.ndarray) -> None:
    """A 16-bit-per-channel PNG (gray + alpha, RGB or RGBA), which Pillow reads but cannot write."""
    import struct
    import zlib

    height, width, channels = pixels.shape
    rows = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, {2: 4, 3: 2, 4: 6}[channels], 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))


def _bmp565(pixels: np.ndarray) -> bytes:
    """A 16-bit-per-pixel (5-6-5) BMP, which Pillow reads but does not write."""
    import struct

    height, width, _ = pixels.shape
    p = pixels.astype(np.uint16)
    packed = ((p[..., 0] >> 3) << 11) | ((p[..., 1] >> 2) << 5) | (p[..., 2] >> 3)
    row = width * 2 + (-width * 2) % 4
    body = b"".join(packed[y].astype("<u2").tobytes().ljust(row, b"\0") for y in range(height - 1, -1, -1))
    masks = struct.pack("<III", 0xF800, 0x07E0, 0x001F)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 16, 3, len(body), 2835, 2835, 0, 0)
    offset = 14 + len(info) + len(masks)
    return b"BM" + struct.pack("<IHHI", offset + len(body), 0, 0, offset) + info + masks + body


def test_a_16_bit_colour_image_pillow_would_turn_black_is_refused(guards, tmp_path):
    """Pillow keeps a 16-bit colour PNG's high bytes: right for full-range data, almost black for 12-bit data."""
    guard = guards["onnxruntime"]
    rgb = np.random.default_rng(0).integers(0, 256, (32, 32, 3)).astype(np.uint16)
    full = tmp_path / "full48.png"
    _png16(full, rgb * 257)
    assert Image.open(full).mode == "RGB"
    np.testing.assert_array_equal(guard.predict(full).logits, guard.predict(Image.fromarray(rgb.astype(np.uint8))).logits)
    for name, pixels in (("twelve_bit.png", rgb * 16), ("eight_in_sixteen.png", rgb),
                         ("twelve_bit_rgba.png", np.dstack([rgb * 16, np.full((32, 32), 4095)])),
                         ("twelve_bit_gray_alpha.png", np.dstack([rgb[..., :1] * 16, np.full((32, 32, 1), 4095)]))):
        _png16(tmp_path / name, pixels)
        with pytest.raises(ImageLoadError, match=rf"{name}' holds 16 bits per sample \(read as \w+\) and its "
                                                 r"values fit in 12 bits: .*reaches (15|0) of 255 here.*x \* 255 / 4095"):
            guard.predict(tmp_path / name)
    with pytest.raises(ImageLoadError, match=r"bytes\) holds 16 bits per sample \(read as RGB\)"):  # from bytes
        guard.predict((tmp_path / "twelve_bit.png").read_bytes())
    # A 5-6-5 BMP packs a pixel in 16 bits, 8 bits a sample once read: not refused, however dark.
    dark = Image.fromarray((rgb // 32).astype(np.uint8))
    dark.save(tmp_path / "dark.bmp")
    assert Image.open(tmp_path / "dark.bmp").mode == "RGB"
    (tmp_path / "dark565.bmp").write_bytes(_bmp565(np.asarray(dark)))
    assert Image.open(tmp_path / "dark565.bmp").tile[0][3][0].endswith(";16")
    assert guard.predict(tmp_path / "dark565.bmp").label in (0, 1)


def test_a_file_of_several_frames_is_refused_not_cut_to_its_first(guards, tmp_path):
    # A TIFF stack or an animation: the model would see the first frame only, and nobody would know.
    frames = [Image.fromarray(np.full((64, 64, 3), v, np.uint8)) for v in (0, 128, 255)]
    frames[0].save(tmp_path / "stack.tif", save_all=True, append_images=frames[1:])
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    for name, kind in (("stack.tif", "TIFF"), ("anim.gif", "GIF")):
        with pytest.raises(ImageLoadError, match=rf"{name}' holds 3 {kind} frames \(pages\) of the same size.*save each"):
            guards["onnxruntime"].predict(tmp_path / name)
    # A smaller second page is the first's preview (a scanner's TIFF thumbnail): the first page is the picture.
    frames[1].save(tmp_path / "with_preview.tif", save_all=True, append_images=[frames[2].resize((16, 16))])
    first_page = guards["onnxruntime"].predict(tmp_path / "with_preview.tif")
    assert first_page.image_size == (64, 64)
    np.testing.assert_allclose(first_page.logits, guards["onnxruntime"].predict(frames[1]).logits, atol=1e-6)
    # A phone's JPEG (MPO: the photo, then its previews) is its first frame.
    mpo = tmp_path / "phone.jpg"
    frames[1].save(mpo, format="MPO", save_all=True, append_images=[frames[2]])
    assert Image.open(mpo).n_frames == 2
    assert guards["onnxruntime"].predict(mpo).image_size == (64, 64)


def test_a_listing_passed_as_an_image_says_so(guards, tmp_path):
    listing = tmp_path / "test.csv"
    listing.write_text("path,label\na.png,benign\n")
    with pytest.raises(ImageLoadError, match=r"cannot read .*test.csv.*'test.csv' looks like a listing.*pass the images "
                                             r"or their folder"):
        guards["onnxruntime"].predict(listing)


def test_a_fifo_named_as_an_image_is_not_called_missing(guards, tmp_path):
    os.mkfifo(tmp_path / "pipe.png")
    with pytest.raises(ImageLoadError, match=r"pipe.png' is not a regular file but a FIFO, socket or device"):
        guards["onnxruntime"].predict(tmp_path / "pipe.png")


@pytest.mark.parametrize(
    "array,message",
    [
        (np.zeros((64, 64, 2), np.uint8), r"expected 1, 3 or 4 channels \(last axis\), got 2"),
        (np.zeros((4, 64, 64), np.float32), r"expected 3 channels first in a preprocessed array, got shape \(4, 64, 64\)"),
        (np.zeros((2, 1, 64, 64), np.float32), r"expected 3 channels first"),
        (np.zeros((3, 32, 32), np.float32), r"expected a preprocessed array of shape \(3, 64, 64\).*got \(3, 32, 32\)"),
        (np.zeros((64, 64, 3), np.float32), r"expected 3 channels first.*transpose HWC to CHW"),
        (np.zeros((1, 1, 3, 64, 64), np.float32), r"expected a float32 preprocessed array of shape.*got 5-D"),
        (np.zeros((3, 64, 64), np.float64), r"expected a float32 preprocessed array, got float64; convert"),
        (np.zeros((64, 64, 3), np.int16), r"expected a uint8 \(H, W, C\) image or a float32 preprocessed"),
        (np.full((64, 64), 4000, np.uint16), r"got dtype uint16 .*convert it to uint8 by one fixed factor for all, e.g. "
                                             r"x \* 255 / 65535 for 16-bit or x \* 255 / 4095 for 12-bit data"),
        (np.full((64, 64), 200, np.int32), r"got dtype int32 .*convert it to uint8 by x.astype\(np.uint8\): the values "
                                           r"already fit"),
        (np.full((64, 64), -1000, np.int16), r"got dtype int16 .*one fixed window for all \(e.g. a CT window\)"),
        (np.zeros((0, 64, 3), np.uint8), r"expected a non-empty image"),
        (np.full((3, 64, 64), np.nan, np.float32), r"expected finite values, got NaN or infinity"),
        # Skipped normalisation: 0-255 floats would be answered near chance.
        (np.full((3, 64, 64), 200.0, np.float32), r"expected pixels normalised with the bundle's mean .* got values "
                                                  r"from 200 to 200; normalise as \(x / 255 - mean\) / std"),
    ],
)
def test_bad_arrays_are_refused_with_what_to_do(guards, array, message):
    with pytest.raises(InputError, match=message):
        guards["onnxruntime"].predict(array)


def test_normalised_arrays_at_the_edge_of_their_range_are_accepted(guards, test_images):
    """Preprocessed arrays reach the ends of the normalised range (and a little past, after bicubic)."""
    guard = guards["onnxruntime"]
    mean, std = np.asarray(guard.preprocessing.mean), np.asarray(guard.preprocessing.std)
    white = ((np.ones((3, *guard.preprocessing.size)) - mean[:, None, None]) / std[:, None, None]).astype(np.float32)
    overshoot = white * 1.05
    assert len(guard.predict([white, -white * 0, overshoot])) == 3
    as_file = guard.predict(test_images[0])
    np.testing.assert_allclose(guard.predict(guard.preprocess(test_images[0])[0]).logits, as_file.logits, atol=1e-5)


def test_bad_arguments_are_refused(guards, demo_bundle, test_images, tmp_path):
    guard = guards["onnxruntime"]
    with pytest.raises(InputError, match="expected batch_size to be a positive integer, got 0"):
        guard.predict(test_images[:2], batch_size=0)
    with pytest.raises(InputError, match=r"expected path in \('fused', 'split'\) or None, got 'fast'"):
        guard.predict(test_images[:2], path="fast")
    with pytest.raises(InputError, match="drop_tokens=True needs the split graphs; pass path='split'"):
        guard.predict(test_images[:2], path="fused", drop_tokens=True)
    with pytest.raises(InputError, match=r"cannot read image \(4 bytes\) \(UnidentifiedImageError"):
        guard.predict(b"\x89PNG")
    # An empty file says so: Pillow's "cannot identify image file" reads like a corrupt one.
    with pytest.raises(InputError, match=r"cannot read image \(0 bytes\): it is empty; expected a PNG"):
        guard.predict(b"")
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(InputError, match=r"cannot read image '.*empty.jpg': it is empty \(0 bytes\).*copy it again"):
        guard.predict(tmp_path / "empty.jpg")
    with open(tmp_path / "empty.jpg", "rb") as opened, pytest.raises(InputError, match=r"it is empty \(0 bytes\)"):
        guard.predict(opened)
    with pytest.raises(InputError, match="encoded image bytes or a binary file object .*got int"):
        guard.predict(42)
    with pytest.raises(InputError, match="expected backend in"):
        Guard.load(demo_bundle, backend="tensorrt")
    with pytest.raises(InputError, match="expected precision in"):
        Guard.load(demo_bundle, precision="int4")
    with pytest.raises(InputError, match="expected precision 'f32' with ONNX Runtime, got 'bf16'; use backend='openvino'"):
        Guard.load(demo_bundle, backend="onnxruntime", precision="bf16")
    with pytest.raises(InputError, match="expected ONNX Runtime providers from .* got \\['NoSuchExecutionProvider'\\]"):
        Guard.load(demo_bundle, providers=["NoSuchExecutionProvider"])


def test_folder_without_manifest_is_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="is not an edgeshort bundle .*create one with `edgeshort export RUN -o BUNDLE`"):
        Guard.load(tmp_path)


def test_bundle_from_a_newer_format_is_refused(demo_bundle, tmp_path):
    root = copy_bundle(demo_bundle, tmp_path)
    rewrite_manifest(root, lambda m: m.update(format=99))
    with pytest.raises(BundleError, match="bundle format 99 is newer than this edgeshort reads.*upgrade edgeshort to the version that "
                                          "exported it"):
        Guard.load(root, backend="onnxruntime")


def test_an_edited_manifest_is_refused(demo_bundle, tmp_path):
    """Swapped class names would invert every answer with the graphs' hashes intact."""
    edits = {
        "class names": lambda m: m.update(class_names=m["class_names"][::-1]),
        "preprocessing": lambda m: m["model"]["preprocessing"].update(mean=[0.4, 0.4, 0.4]),
        "a graph's hash entry": lambda m: m["files"].pop("plain.onnx"),
    }
    for what, edit in edits.items():
        root = copy_bundle(demo_bundle, tmp_path / what)
        rewrite_manifest(root, edit)
        with pytest.raises(BundleError, match="was edited after export .* re-export the bundle, or, for a deliberate "
                                              r"change, write it with edgeshort.runtime.bundle.write_manifest"):
            Guard.load(root, backend="onnxruntime")
    root = copy_bundle(demo_bundle, tmp_path / "unsealed")
    rewrite_manifest(root, lambda m: m.pop("seal"))
    with pytest.raises(BundleError, match="has no seal, so its class names.*re-export the bundle"):
        Guard.load(root, backend="onnxruntime")
    # A deliberate change written through write_manifest is sealed again; a graph left unhashed is still refused.
    root = copy_bundle(demo_bundle, tmp_path / "resealed")
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["guard"]["warnings"] = ["checked by hand"]
    write_manifest(root, manifest)
    assert Guard.load(root, backend="onnxruntime").bundle.manifest["guard"]["warnings"] == ["checked by hand"]
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["files"].pop("plain.onnx")
    manifest["seal"] = bundle_module.manifest_seal(manifest)
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="lists no hash for its graph file 'plain.onnx'"):
        Guard.load(root, backend="onnxruntime")


def test_a_pinned_bundle_refuses_a_resealed_copy(demo_bundle, tmp_path, capsys):
    pinned = demo_bundle.manifest_sha256
    assert Guard.load(demo_bundle, backend="onnxruntime", expected_sha256=pinned.upper()).info.manifest_sha256 == pinned
    # The seal stops hand edits, but whoever can write a bundle can seal it again: only a pin tells.
    root = copy_bundle(demo_bundle, tmp_path)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["class_names"] = manifest["class_names"][::-1]
    write_manifest(root, manifest)
    assert Guard.load(root, backend="onnxruntime").class_names == tuple(manifest["class_names"])
    with pytest.raises(BundleError, match=rf"is not the one pinned: its manifest.json has sha256 [0-9a-f]{{64}}, "
                                          rf"expected {pinned}; it was re-exported or changed"):
        Guard.load(root, backend="onnxruntime", expected_sha256=pinned)
    from edgeshort.cli import main

    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(image)
    assert main(["predict", str(root), str(image), "--bundle-sha256", pinned, "--quiet"]) == 2
    assert "is not the one pinned" in capsys.readouterr().err
    # A whole `sha256sum` line, or an empty pin, is a malformed pin, not another bundle.
    for malformed in (f"{pinned}  manifest.json", ""):
        with pytest.raises(InputError, match=r"expected the pinned sha256 as 64 hex digits.*first field of `sha256sum"):
            Guard.load(demo_bundle, backend="onnxruntime", expected_sha256=malformed)


RESEALED_MANIFEST_FAULTS = {
    # The seal has no key: whoever can write a bundle can seal any manifest, so its fields are checked too.
    "graph outside": (lambda m: m["graphs"]["guarded"]["files"].update(onnx="/etc/passwd"),
                      r"expected graphs.guarded.files to be file names inside the bundle folder, got '/etc/passwd'"),
    "file upward": (lambda m: m["files"].update({"../outside.onnx": {"sha256": "0" * 64, "bytes": 1}}),
                    r"expected files to be file names inside the bundle folder, got '../outside.onnx'"),
    "no classes": (lambda m: m.update(class_names=[]), r"expected class_names to be a list of two or more distinct"),
    "same class twice": (lambda m: m.update(class_names=["x", "x"]), r"expected class_names to be .* got \['x', 'x'\]"),
    "classes as text": (lambda m: m.update(class_names="bm"), r"expected class_names to be .* got 'bm'"),
    "a class too many": (lambda m: m.update(class_names=["a", "b", "c"]),
                         r"expected model.num_classes to be the number of class_names \(3\), got 2"),
    "negative size": (lambda m: m["model"]["preprocessing"].update(size=[-64, -64]),
                      r"model.preprocessing is unusable \(expected size as \(height, width\), two whole numbers"),
    "giant size": (lambda m: m["model"]["preprocessing"].update(size=[100000, 100000]), r"from 1 to 4096, got"),
    "mean as text": (lambda m: m["model"]["preprocessing"].update(mean="abc"), r"expected mean as three finite"),
    "tiny crop": (lambda m: m["model"]["preprocessing"].update(crop_pct=1e-9), r"expected crop_pct as a fraction"),
    "guard null": (lambda m: m.update(guard=None), r"expected guard to be an object, got None"),
    "grid as text": (lambda m: m["model"].update(grid="8x8"), r"expected model.grid to be two positive whole numbers"),
    "enlargement as text": (lambda m: m["guard"].update(calibration_enlargement="big"),
                            r"expected guard.calibration_enlargement to be a positive number, got 'big'"),
    "verdict as text": (lambda m: m["guard"].update(verdict="found"),
                        r"expected guard.verdict to be an object with verdict and summary texts, got 'found'"),
    "hash entry as text": (lambda m: m["files"].update({"plain.onnx": "abc"}),
                           r"expected files.plain.onnx to be an object with a sha256 text"),
}


@pytest.mark.parametrize("fault", RESEALED_MANIFEST_FAULTS)
def test_a_resealed_manifest_is_checked_field_by_field(demo_bundle, tmp_path, fault):
    edit, message = RESEALED_MANIFEST_FAULTS[fault]
    manifest = json.loads((demo_bundle.root / "manifest.json").read_text())
    edit(manifest)
    manifest["seal"] = bundle_module.manifest_seal(manifest)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))  # the fields are checked before any file
    with pytest.raises(BundleError, match=message + ".*re-export the bundle"):
        Guard.load(tmp_path, backend="onnxruntime")


def test_a_manifest_that_is_not_a_manifest_object_is_refused(tmp_path):
    cases = {b"[]": "holds a JSON list, not a manifest object",
             '{"a": "\xe9"}'.encode("latin-1"): "is not valid JSON .*UnicodeDecodeError",  # not UTF-8
             b"[" * 100_000 + b"]" * 100_000: "is not valid JSON .*RecursionError"}
    for raw, message in cases.items():
        (tmp_path / "manifest.json").write_bytes(raw)
        with pytest.raises(BundleError, match=message):
            Guard.load(tmp_path)


def test_the_graphs_class_count_must_match_the_manifest(demo_bundle, tmp_path):
    root = copy_bundle(demo_bundle, tmp_path)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["class_names"].append("third")
    del manifest["model"]["num_classes"]
    write_manifest(root, manifest)
    for backend in BACKENDS:
        with pytest.raises(BundleError, match=r"its (guarded|plain) graph scores .*2.* classes, but the manifest names 3"):
            Guard.load(root, backend=backend)


def test_a_bundle_file_of_the_wrong_size_is_refused_before_it_is_read(demo_bundle, tmp_path, monkeypatch):
    root = copy_bundle(demo_bundle, tmp_path)
    with open(root / "guarded.onnx", "ab") as fh:
        fh.truncate(2**30)  # a sparse gigabyte: hashing it would take seconds
    monkeypatch.setattr(bundle_module, "sha256_file", lambda path: pytest.fail(f"{path} was read"))
    with pytest.raises(BundleError, match=r"bundle file 'guarded.onnx' holds 1,073,741,824 bytes, its manifest says"):
        Guard.load(root, backend="onnxruntime")


def test_bundle_access_problems_say_what_is_wrong(demo_bundle, tmp_path, monkeypatch):
    with pytest.raises(BundleError, match="bundle folder '.*nowhere' does not exist; check the path"):
        Guard.load(tmp_path / "nowhere")
    (tmp_path / "a-file").write_text("")
    with pytest.raises(InputError, match="expected cache_dir to be a folder this user can create.*drop cache_dir"):
        Guard.load(demo_bundle, backend="openvino", cache_dir=tmp_path / "a-file" / "cache")
    with pytest.raises(TypeError, match=r"a Guard is made with Guard.load\(bundle_folder"):
        Guard(str(demo_bundle.root))

    def unreadable(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(bundle_module, "sha256_file", unreadable)  # root reads any file, so the test pretends
    with pytest.raises(BundleError, match="cannot read '.*' \\(Permission denied\\); give this user read access"):
        Guard.load(demo_bundle, backend="onnxruntime")


def test_tampered_bundle_is_refused(demo_bundle, tmp_path):
    root = copy_bundle(demo_bundle, tmp_path)
    data = bytearray((root / "guarded.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (root / "guarded.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="'guarded.onnx' does not match its manifest hash.*re-export the bundle"):
        Guard.load(root, backend="onnxruntime")


def test_onnx_ir_version_too_new_is_named(demo_bundle, tmp_path):
    onnx = pytest.importorskip("onnx")
    root = copy_bundle(demo_bundle, tmp_path)
    path = root / "guarded.onnx"
    model = onnx.load(str(path))
    model.ir_version = 99
    onnx.save(model, str(path))
    write_manifest(root, json.loads((root / "manifest.json").read_text()))  # the new file's hash, sealed
    with pytest.raises(BundleError, match="guarded.onnx has ONNX IR version 99, newer than the installed runtime"):
        Guard.load(root, backend="onnxruntime")


def test_missing_backend_names_the_extra(demo_bundle, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # makes `import openvino` fail
    with pytest.raises(MissingDependencyError, match=r"pip install 'edgeshort\[openvino\]'"):
        Guard.load(demo_bundle, backend="openvino")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(MissingDependencyError, match=r"'onnxruntime' is a core dependency of edgeshort but is not "
                                                     r"importable \(ModuleNotFoundError: .*\); upgrade it with: pip "
                                                     r"install --upgrade 'onnxruntime>=1.18.1'"):
        Guard.load(demo_bundle, backend="onnxruntime")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims width x height but holds a few bytes of pixels: decoding it would fail."""
    header = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + header + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + _png_chunk(b"IEND", b""))


def test_images_over_the_pixel_limit_are_refused_before_decoding(demo_bundle, guards, test_images, tmp_path,
                                                                 monkeypatch):
    # The claimed size would be 7,000 x 7,000 x 3 = 147 MB decoded; the file is under 100 bytes, and
    # decoding it would fail as truncated: the pixel-limit message shows it was refused before that.
    bomb = tmp_path / "bomb.png"
    _png_header_only(bomb, 7000, 7000)
    with pytest.raises(ImageLoadError, match=r"at most 1,000,000 pixels, got .*bomb.png.* with 7000x7000 = 49,000,000"):
        load_image(bomb, max_pixels=1_000_000)
    strict = Guard.load(demo_bundle, backend="onnxruntime", max_pixels=64 * 64 - 1)
    with pytest.raises(ImageLoadError, match=r"at most 4,095 pixels, got image with 64x64 = 4,096; downscale it"):
        strict.predict(test_images[0])
    with pytest.raises(ImageLoadError, match="at most 4,095 pixels"):
        strict.predict(Image.fromarray(test_images[0]))
    # Past Pillow's own limit the file is refused inside Image.open; the message still says what to do.
    huge = tmp_path / "huge.png"
    _png_header_only(huge, 60_000, 60_000)
    with pytest.raises(ImageLoadError, match="decompression-bomb limit caps max_pixels.*downscale it first"):
        guards["onnxruntime"].predict(huge)
    # A max_pixels above Pillow's limit would not take effect: refused, with how to lift Pillow's.
    with pytest.raises(InputError, match=r"at most 178,956,970, Pillow's own decompression-bomb limit, got "
                                         r"1,000,000,000.*PIL.Image.MAX_IMAGE_PIXELS = None"):
        Guard.load(demo_bundle, backend="onnxruntime", max_pixels=1_000_000_000)
    # The CLI owns its process: there --max-pixels moves Pillow's limit, and its own check still refuses from the header.
    from edgeshort.cli import main

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
    small = tmp_path / "small.png"
    Image.fromarray(test_images[0]).save(small)
    assert main(["predict", str(demo_bundle.root), str(small), "--max-pixels", "1000000000", "--quiet",
                 "-o", str(tmp_path / "r.jsonl")]) == 0
    assert Image.MAX_IMAGE_PIXELS == 1_000_000_000
    assert main(["predict", str(demo_bundle.root), str(huge), "--max-pixels", "1000000000", "--quiet",
                 "-o", str(tmp_path / "r2.jsonl")]) == 1
    record = json.loads((tmp_path / "r2.jsonl").read_text())
    assert "at most 1,000,000,000 pixels" in record["error"] and "truncated" not in record["error"]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    assert Guard.load(demo_bundle, backend="onnxruntime", max_pixels=1_000_000_000).max_pixels == 1_000_000_000


# -- reliability ----------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_threads_sharing_one_guard_get_identical_results(guards, backend, test_images, mixed_indices):
    guard = guards[backend]
    images = test_images[mixed_indices]
    expected = guard.predict(images, batch_size=4)
    start = threading.Barrier(4)

    def work(_):
        start.wait()
        return [guard.predict(images, batch_size=4) for _ in range(3)]

    with ThreadPoolExecutor(4) as pool:
        for runs in pool.map(work, range(4)):
            for results in runs:
                assert_same_results(results, expected)


def test_split_graphs_compile_once_under_concurrent_first_use(demo_bundle, test_images):
    guard = Guard.load(demo_bundle, backend="onnxruntime")
    with ThreadPoolExecutor(4) as pool:
        runs = list(pool.map(lambda _: guard.predict(test_images[:6], path="split"), range(4)))
    for results in runs[1:]:
        assert_same_results(results, runs[0])
    assert sorted(guard.info.compiled) == sorted(["guarded", "plain", "embed", "guard", "encoder_head"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_memory_stays_flat_over_2000_predictions(guards, backend, test_images):
    psutil = pytest.importorskip("psutil")
    guard = guards[backend]
    process = psutil.Process()
    images = [test_images[i % len(test_images)] for i in range(40)]
    for image in images * 5:  # warm-up: allocator pools and request pools reach their steady size
        guard.predict(image)
    before = process.memory_info().rss
    for i in range(2000):
        guard.predict(images[i % len(images)])
    growth = (process.memory_info().rss - before) / before
    assert growth < 0.10, f"resident memory grew by {growth:.1%} over 2,000 predictions"


# -- property-based: malformed input never escapes as an undocumented error ----------------------
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

DTYPES = [np.uint8, np.float32, np.float64, np.float16, np.int16, np.int64, np.bool_, np.complex64]
NEAR_VALID_SHAPES = st.sampled_from(
    [(3, 64, 64), (1, 3, 64, 64), (2, 3, 64, 64), (64, 64, 3), (64, 64), (64, 64, 4), (2, 64, 64, 3),
     (64, 64, 1), (1, 64, 64, 3, 1), (0, 3, 64, 64), (3, 64, 0), (5, 9, 2)]
)
SHAPES = st.one_of(NEAR_VALID_SHAPES, hnp.array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=6))


@st.composite
def malformed_arrays(draw):
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    shape = draw(SHAPES)
    elements = None
    if dtype.kind == "f":
        elements = st.floats(allow_nan=True, allow_infinity=True, width=dtype.itemsize * 8)
    return draw(hnp.arrays(dtype, shape, elements=elements, fill=elements))


FUZZ = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                         HealthCheck.data_too_large])


def _outcome(guard: Guard, item) -> str:
    try:
        out = guard.predict(item)
    except EdgeshortError:
        return "error"
    results = out if isinstance(out, list) else [out]
    assert all(isinstance(r, GuardResult) for r in results)
    for r in results:
        assert np.isfinite(r.logits).all() and r.flags.shape == r.saliency.shape
    return "result"


@FUZZ
@given(array=malformed_arrays())
def test_fuzzed_arrays_give_a_result_or_a_documented_error(guards, array):
    _outcome(guards["onnxruntime"], array)
    _outcome(guards["onnxruntime"], [array])


PREFIXES = st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"BM", b"II*\x00", b"P6\n"])


@FUZZ
@given(prefix=PREFIXES, body=st.binary(min_size=0, max_size=2048), suffix=st.sampled_from([".png", ".jpg", ".bin"]))
def test_fuzzed_files_give_a_result_or_a_documented_error(guards, tmp_path_factory, prefix, body, suffix):
    path = tmp_path_factory.mktemp("fuzz") / f"file{suffix}"
    path.write_bytes(prefix + body)
    _outcome(guards["onnxruntime"], path)


def test_a_thumbnail_is_predicted_with_a_warning_that_names_its_size(guards, test_images, demo_bundle, tmp_path):
    from PIL import Image

    guard = guards["onnxruntime"]
    full = Image.fromarray(test_images[0])  # the model's own input size: no warning
    thumbnail = full.resize((12, 12), Image.BILINEAR)
    whole, small, tensor = guard.predict([full, thumbnail, guard.preprocess(full)[0]])
    assert whole.image_size == full.size and whole.enlargement == pytest.approx(1.0) and whole.warning is None
    assert small.image_size == (12, 12) and small.enlargement == pytest.approx(full.width / 12)
    assert demo_bundle.manifest["guard"]["calibration_enlargement"] == 1.0  # the demo's images are the input size
    assert small.warning.startswith("the image is 12 x 12 pixels, enlarged 5.3-fold to the model's input (over "
                                    "4-fold)")
    assert small.to_dict()["image_size"] == [12, 12] and small.to_dict()["warning"] == small.warning
    assert tensor.image_size is None and tensor.enlargement is None and tensor.warning is None  # size unknown
    assert guard.predict(full.resize((17, 17))).warning is None  # 3.8-fold: a low-resolution scan, still read
    # A model calibrated on small images (scans upsampled to its input) warns only well beyond them.
    small_data = tmp_path / "small"
    shutil.copytree(demo_bundle.root, small_data)
    manifest = json.loads((small_data / "manifest.json").read_text())
    manifest["guard"]["calibration_enlargement"] = 4.0
    write_manifest(small_data, manifest)  # sealed again: a deliberate change
    upsampled = Guard.load(small_data, backend="onnxruntime").predict([thumbnail, full.resize((3, 3))])
    assert upsampled[0].warning is None and upsampled[0].enlargement_limit == 16.0
    assert "enlarged 21.3-fold to the model's input (over 16-fold)" in upsampled[1].warning


def test_result_gives_the_final_probability_and_warns_when_flags_cover_most_of_the_image():
    grid = np.zeros((4, 4), bool)

    def result(flagged: int, dfr_logits=None) -> GuardResult:
        flags = grid.copy()
        flags.flat[:flagged] = True
        return GuardResult(
            logits=np.array([2.0, 0.0]), label=0, class_name="a", ablated_logits=np.array([0.0, np.log(3.0)]),
            ablated_label=1, ablated_class_name="b", dfr_logits=dfr_logits, dfr_label=None if dfr_logits is None else 0,
            dfr_class_name=None if dfr_logits is None else "a", flags=flags, raw_flags=flags, saliency=grid * 0.0,
            shortcut_present=flagged > 0, class_names=("a", "b"))

    assert result(3).final_probability == pytest.approx(0.75)  # softmax of the ablated logits, label b
    assert result(3, np.array([np.log(4.0), 0.0])).final_probability == pytest.approx(0.8)  # the DFR head's
    assert result(8).warning is None  # half the patches: still a plausible artefact
    warned = result(9)
    assert warned.warning.startswith("flags cover 9 of 16 patches") and warned.to_dict()["warning"] == warned.warning
    assert "saw none of the image, so do not use it" in result(16).warning
    json.dumps(warned.to_dict())
