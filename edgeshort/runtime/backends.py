"""Inference backends behind one small interface: ONNX Runtime and OpenVINO.

Settings are explicit: ONNX Runtime always gets its providers list and thread count;
OpenVINO compiles with a performance hint, an optional cache dir, and f32 inference precision
unless bf16 is asked for (it otherwise runs bf16 silently on CPUs that have it).
"""

from __future__ import annotations

import importlib
import logging
import platform
import queue
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import numpy as np

from edgeshort._optional import require
from edgeshort.errors import BundleError, InputError, MissingDependencyError

logger = logging.getLogger(__name__)

BACKENDS = ("onnxruntime", "openvino")
PRECISIONS = ("f32", "bf16")
# ONNX Runtime providers for a `device` name, CPU last as the fallback for unsupported operators.
ORT_DEVICE_PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "gpu": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "coreml": ["CoreMLExecutionProvider", "CPUExecutionProvider"],
    "directml": ["DmlExecutionProvider", "CPUExecutionProvider"],
}
# Device names only ONNX Runtime has (OpenVINO's own are upper case: "CPU", "GPU", "NPU", "AUTO").
ORT_ONLY_DEVICES = ("cuda", "coreml", "directml")
# OpenVINO reports its inference precision as an element type; the names users pass are shorter.
_OV_PRECISION_NAMES = {"f32": "f32", "float32": "f32", "bf16": "bf16", "bfloat16": "bf16", "f16": "f16",
                       "float16": "f16"}


class Session:
    """A compiled graph: `run({name: array}) -> {name: array}`, safe to call from several threads."""

    backend: str
    input_names: list[str]
    output_names: list[str]
    description: dict

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError


def _ir_error(exc: Exception, path: Path) -> BundleError | None:
    match = re.search(r"IR version:? (\d+).*max supported IR version:? (\d+)", str(exc), re.I)
    if not match:
        return None
    return BundleError(
        f"{path.name} has ONNX IR version {match.group(1)}, newer than the installed runtime reads "
        f"(max {match.group(2)}); upgrade onnxruntime, or re-export the bundle with a lower IR version"
    )


def import_onnxruntime() -> ModuleType:
    """onnxruntime is a core dependency, so a missing one means a broken install, not a missing extra."""
    try:
        return importlib.import_module("onnxruntime")
    except ImportError as exc:
        raise MissingDependencyError(
            f"'onnxruntime' is a core dependency of edgeshort but is not importable ({type(exc).__name__}: {exc}); "
            "upgrade it with: pip install --upgrade 'onnxruntime>=1.18.1' (or the onnxruntime-gpu build you use; "
            "a build made for NumPy 1 fails to import beside NumPy 2), or use backend='openvino' after "
            "pip install 'edgeshort[openvino]'"
        ) from exc


def check_threads(threads) -> None:
    """Refuse an inference thread count that is not a positive whole number (None: the backend's default)."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, (int, np.integer))
                                or threads < 1):
        raise InputError(f"expected threads to be a positive integer or None, got {threads!r}; e.g. threads=2 "
                         "(--threads 2), or leave it out for the backend's default")


def ort_providers(providers: list[str] | None, device: str | None) -> list[str]:
    """The providers list ONNX Runtime gets: as given, or derived from a device name, else CPU."""
    if providers:
        return list(providers)
    if device is None:
        return ["CPUExecutionProvider"]
    key = device.lower()
    if key not in ORT_DEVICE_PROVIDERS:
        raise InputError(
            f"expected an ONNX Runtime device from {sorted(ORT_DEVICE_PROVIDERS)}, got {device!r}; "
            "or, in Python, pass providers=[...] explicitly"
        )
    return list(ORT_DEVICE_PROVIDERS[key])


class OnnxRuntimeSession(Session):
    backend = "onnxruntime"

    def __init__(self, path: Path, providers: list[str] | None = None, threads: int | None = None,
                 map_weights: bool = False) -> None:
        ort = import_onnxruntime()
        available = ort.get_available_providers()
        providers = providers or ["CPUExecutionProvider"]
        missing = [p for p in providers if p not in available]
        if missing:
            raise InputError(
                f"expected ONNX Runtime providers from {available}, got {missing}; install the onnxruntime "
                "build that has them (e.g. onnxruntime-gpu for CUDA) or choose from the available ones"
                + ("; for an Intel GPU, run OpenVINO: backend 'openvino' with device 'GPU' (upper case; lower-case "
                   "'gpu' is CUDA through ONNX Runtime)" if "CUDAExecutionProvider" in missing else "")
            )
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        if map_weights:
            # Prepacking copies each weight into the session; without it ONNX Runtime runs on the external-data
            # file as it memory-maps it, one copy in memory for every session and process that maps it.
            options.add_session_config_entry("session.disable_prepacking", "1")
        try:
            self._session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        except Exception as exc:
            raise (_ir_error(exc, path) or BundleError(f"ONNX Runtime cannot load {path.name}: {exc}")) from exc
        self.input_names = [i.name for i in self._session.get_inputs()]
        self.output_names = [o.name for o in self._session.get_outputs()]
        self.description = {"backend": self.backend, "providers": self._session.get_providers(),
                            "threads": threads, "precision": "f32", "version": ort.__version__,
                            "map_weights": map_weights}

    def run(self, inputs):
        # InferenceSession.run is thread-safe.
        return dict(zip(self.output_names, self._session.run(self.output_names, inputs)))


class OpenVINOSession(Session):
    backend = "openvino"

    def __init__(
        self, path: Path, device: str | None = None, threads: int | None = None, precision: str = "f32",
        hint: str = "LATENCY", cache_dir: str | None = None,
    ) -> None:
        ov = require("openvino", "openvino")
        if precision not in PRECISIONS:
            raise InputError(f"expected precision in {PRECISIONS}, got {precision!r}")
        core = ov.Core()
        device = (device or "CPU").upper()  # OpenVINO's names are upper case; "cpu" means its "CPU"
        unknown = unknown_openvino_devices(device, core.available_devices)
        if unknown:
            raise InputError(
                f"expected an OpenVINO device from {core.available_devices} (or AUTO, MULTI, HETERO over them, "
                f"e.g. AUTO:GPU,CPU), got {device!r}: {', '.join(unknown)} is not on this machine; `edgeshort env` "
                "lists its devices"
            )
        config = {"PERFORMANCE_HINT": hint}
        if device.split(":")[0] in ("CPU", "AUTO", "MULTI", "HETERO"):
            # Unasked, OpenVINO runs bf16 on CPUs that have it, behind "AUTO:CPU" and the like too.
            config["INFERENCE_PRECISION_HINT"] = precision
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        if cache_dir:
            try:  # OpenVINO would blame the model it compiles for a cache folder it cannot write
                make_writable_folder(Path(cache_dir))
            except OSError as exc:
                raise InputError(f"expected cache_dir to be a folder this user can create and write, got "
                                 f"{str(cache_dir)!r} ({exc.strerror or exc}); choose another folder or drop "
                                 "cache_dir") from exc
            config["CACHE_DIR"] = str(cache_dir)
        try:
            model = core.read_model(str(path))
            self._compiled = core.compile_model(model, device, config)
        except Exception as exc:
            raise BundleError(f"OpenVINO cannot load {path.name}: {exc}") from exc
        self.input_names = [p.get_any_name() for p in self._compiled.inputs]
        self.output_names = [p.get_any_name() for p in self._compiled.outputs]
        self._outputs = list(self._compiled.outputs)
        # Idle infer requests; each call takes one (or makes one), so threads never share a request.
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        ran = self._compiled_precision() or precision
        if ran != precision:
            logger.warning("OpenVINO on %s runs %s although %s was asked for", device, ran, precision)
        self.description = {"backend": self.backend, "device": device, "threads": threads, "precision": ran,
                            "hint": hint, "version": ov.__version__}

    def _compiled_precision(self) -> str | None:
        try:
            value = self._compiled.get_property("INFERENCE_PRECISION_HINT")
        except Exception:  # not every device reports it
            return None
        name = str(getattr(value, "to_string", lambda: value)()).lower()
        return _OV_PRECISION_NAMES.get(name, name or None)

    def run(self, inputs):
        try:
            request = self._requests.get_nowait()
        except queue.Empty:
            request = self._compiled.create_infer_request()
        try:
            # share_outputs=False: the arrays are copies, so reusing the request cannot overwrite them.
            result = request.infer(inputs, share_outputs=False)
            return {name: np.asarray(result[port]) for name, port in zip(self.output_names, self._outputs)}
        finally:
            self._requests.put(request)


VIRTUAL_OPENVINO_DEVICES = ("AUTO", "MULTI", "HETERO", "BATCH")


def unknown_openvino_devices(device: str, available: Sequence[str]) -> list[str]:
    """The device names in `device` ("GPU", "GPU.1", "AUTO:GPU,-CPU", "HETERO:GPU,CPU") this machine lacks.

    "GPU" is known where OpenVINO lists "GPU.0", "GPU.1" (it means the first), and "GPU.0" where it lists "GPU"."""
    virtual, _, listed = device.partition(":")
    if virtual in VIRTUAL_OPENVINO_DEVICES:
        names = [name.strip().lstrip("-").split("(")[0] for name in listed.split(",") if name.strip()]
    else:
        names = [device]
    return [name for name in names
            if name not in available and not any(a.startswith(name + ".") for a in available)
            and not (name.endswith(".0") and name[:-2] in available)]


def is_intel_cpu() -> bool:
    name = platform.processor() or ""
    if "intel" not in name.lower() and Path("/proc/cpuinfo").is_file():
        text = Path("/proc/cpuinfo").read_text(errors="ignore")
        name = next((line for line in text.splitlines() if line.startswith("vendor_id")), name)
    return "intel" in name.lower()


def make_writable_folder(folder: Path) -> None:
    """Create `folder` and a file in it now (OSError if either fails), so that a folder a run cannot write
    fails before the work. A file is made rather than permissions read: root, ACLs and read-only mounts
    answer only to trying."""
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=folder):
        pass


def is_onnxruntime_device(device: str | None) -> bool:
    """Whether `device` names an ONNX Runtime device ("cpu", "cuda", "coreml", ...); OpenVINO's are upper case."""
    return device is not None and (device in ORT_DEVICE_PROVIDERS or device.lower() in ORT_ONLY_DEVICES)


def choose_backend(backend: str, formats: Sequence[str] = ("onnx", "openvino"), device: str | None = None) -> str:
    """`auto`: OpenVINO when it is installed and the bundle has OpenVINO IR (`formats`), on an Intel CPU
    or for an OpenVINO device ("GPU", "NPU", "AUTO", ...), unless `device` names an ONNX Runtime
    device ("cpu", "cuda", "coreml", ...); else ONNX Runtime."""
    if backend not in ("auto", *BACKENDS):
        raise InputError(f"expected backend in {('auto', *BACKENDS)}, got {backend!r}")
    if backend != "auto":
        return backend
    if is_onnxruntime_device(device):
        return "onnxruntime"
    # OpenVINO's own device names (its "CPU" is also ONNX Runtime's, so it decides nothing).
    asks_openvino = (device is not None
                     and device.split(":")[0].split(".")[0] in ("GPU", "NPU", *VIRTUAL_OPENVINO_DEVICES))
    other_choice = f"or pass an ONNX Runtime device ({', '.join(sorted(ORT_DEVICE_PROVIDERS))})"
    if "openvino" not in formats:
        if asks_openvino:
            raise BundleError(f"expected a bundle with OpenVINO IR for the OpenVINO device {device!r}, got one with "
                              f"ONNX only; re-export it with --formats onnx,openvino (OpenVINO installed), {other_choice}")
        return "onnxruntime"
    if asks_openvino or is_intel_cpu():
        try:
            importlib.import_module("openvino")
            return "openvino"
        except ImportError as exc:
            if asks_openvino:
                raise MissingDependencyError(
                    f"{device!r} is an OpenVINO device, and OpenVINO is not installed; install it with: "
                    f"pip install 'edgeshort[openvino]', {other_choice}") from exc
            logger.info("Intel CPU but OpenVINO is not installed; using ONNX Runtime")
    return "onnxruntime"


def open_session(path: Path, backend: str, device=None, threads=None, precision="f32", providers=None,
                 hint="LATENCY", cache_dir=None, map_weights: bool = False) -> Session:
    """A compiled graph on `backend`; `map_weights` (ONNX Runtime) runs on its memory-mapped external weights."""
    if backend == "onnxruntime":
        if precision != "f32":
            raise InputError(
                f"expected precision 'f32' with ONNX Runtime, got {precision!r}; use backend='openvino' (CLI: --backend openvino) for bf16"
            )
        return OnnxRuntimeSession(path, ort_providers(providers, device), threads, map_weights)
    if map_weights:
        raise InputError("map_weights is ONNX Runtime's (backend 'onnxruntime'); OpenVINO maps its IR weights itself")
    if backend == "openvino":
        if providers:
            raise InputError(f"expected no providers with OpenVINO (they are ONNX Runtime's), got {providers}; "
                             "use device= to choose an OpenVINO device")
        return OpenVINOSession(path, device, threads, precision, hint, cache_dir)
    raise InputError(f"expected backend in {BACKENDS}, got {backend!r}")
