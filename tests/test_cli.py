"""The command line: light to start, clear about errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def test_help_does_not_import_torch():
    code = (
        "import sys\n"
        "from edgeshort.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'sklearn', 'onnx', 'openvino') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
    assert "detect" in out.stdout and "export" in out.stdout


def test_cli_choices_are_the_librarys(tmp_path):
    # The parsers spell their choices out, so that `--help` loads no library module; this keeps them in step.
    from edgeshort.cli import build_parser
    from edgeshort.data.synthetic import ARTEFACTS
    from edgeshort.export.exporter import GRAPH_SETS
    from edgeshort.runtime.backends import BACKENDS
    from edgeshort.runtime.guard import GUARD_PRECISIONS

    def choices(command: str, option: str) -> tuple:
        parser = build_parser(only=command)
        sub = next(a for a in parser._actions if a.dest == "command").choices[command]
        return tuple(next(a for a in sub._actions if option in a.option_strings).choices)

    assert choices("predict", "--backend") == ("auto", *BACKENDS)
    assert choices("predict", "--precision") == GUARD_PRECISIONS
    assert choices("export", "--graphs") == tuple(GRAPH_SETS)
    assert choices("demo", "--artefact") == ARTEFACTS and choices("detect", "--demo") == ARTEFACTS


def test_env_prints_versions_backends_and_whether_openvino_reports_usage(tmp_path, monkeypatch):
    from edgeshort import __version__
    from edgeshort.commands.env import openvino_telemetry

    # A user who never opted out: OpenVINO's import reports usage, and env says so and how to stop it (checked
    # in-process, so the test itself imports nothing that reports).
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in ("CI", "TF_BUILD", "JENKINS_URL"):
        monkeypatch.delenv(name, raising=False)
    assert openvino_telemetry() == "on (opt out once per user: mkdir -p ~/intel && echo 0 > ~/intel/openvino_telemetry)"
    (home / "intel").mkdir()
    (home / "intel" / "openvino_telemetry").write_text("0")  # the opt-out the README gives
    assert openvino_telemetry() == "off"
    import os

    out = subprocess.run([sys.executable, "-m", "edgeshort", "env", "--json"], capture_output=True, text=True,
                         check=True, env=dict(os.environ))
    info = json.loads(out.stdout)
    assert info["edgeshort"] == __version__ and info["openvino_telemetry"] == "off"
    assert info["packages"]["onnxruntime"] and info["packages"]["torch"] and "CPUExecutionProvider" in info["onnxruntime_providers"]
    assert info["packages"]["psutil"] and info["openvino_devices"] and "CPU" in info["openvino_devices"]
    assert 1 <= info["usable_cores"] <= info["cpu_count"]
    version = subprocess.run([sys.executable, "-m", "edgeshort", "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.strip() == f"edgeshort {__version__}"


def test_offline_steps_on_a_runtime_only_install_name_the_extra(tmp_path, import_blocker):
    """Without torch and scikit-learn (the core install), offline commands and names say what to install."""
    blocked = {"torch", "torchvision", "sklearn", "scipy", "onnx", "onnxscript", "skl2onnx", "pytorch_grad_cam"}
    np_path = tmp_path / "maps.npy"
    __import__("numpy").save(np_path, __import__("numpy").random.default_rng(0).random((12, 8, 8)))
    script = import_blocker(blocked) + (
        "import edgeshort\n"
        "from edgeshort.cli import main\n"
        f"codes = [main(['detect', '--demo', '-o', {str(tmp_path / 'run')!r}]),\n"
        f"         main(['spray', '--heatmaps', {str(np_path)!r}, '--out', {str(tmp_path / 'spray')!r}])]\n"
        "try:\n    edgeshort.ShortcutDetector\nexcept edgeshort.errors.MissingDependencyError as exc:\n"
        "    print('python:', exc)\n"
        "print('codes', codes)\n"
        "import importlib\n"
        "from edgeshort.models import Preprocessing  # torch-free, as the runtime's\n"
        "for module, name in (('edgeshort.models', 'load_adapter_file'), ('edgeshort.export', 'export_bundle')):\n"
        "    try:\n        getattr(importlib.import_module(module), name)\n"
        "    except edgeshort.errors.MissingDependencyError as exc:\n        print(f'{module}.{name}:', exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "codes [2, 2]" in out.stdout
    assert "edgeshort detect: error: this needs 'torch', which is not installed; install it with: pip install " \
           "'edgeshort[offline]'" in out.stderr
    assert "edgeshort spray: error: this needs 'sklearn'" in out.stderr and "Traceback" not in out.stderr
    assert "python: this needs 'torch'" in out.stdout and "edgeshort[offline]" in out.stdout
    for name in ("edgeshort.models.load_adapter_file", "edgeshort.export.export_bundle"):
        assert f"{name}: this needs 'torch', which is not installed; install it with: pip install 'edgeshort[offline]'" \
            in out.stdout


def test_demo_names_a_missing_extra_before_it_starts(tmp_path, monkeypatch, capsys):
    """The demo's last stages need OpenVINO and matplotlib: without one, it stops before training, not after."""
    from edgeshort.cli import main

    for module, extra in (("openvino", "openvino"), ("matplotlib", "report")):
        with monkeypatch.context() as patch:
            patch.setitem(sys.modules, module, None)  # makes `import` fail, as when not installed
            assert main(["demo", "--out", str(tmp_path / "demo"), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert f"edgeshort demo: error: {module!r} is needed here" in err and f"pip install 'edgeshort[{extra}]'" in err
        assert not (tmp_path / "demo").exists()


def test_user_errors_exit_2_with_the_message(tmp_path):
    out = subprocess.run([sys.executable, "-m", "edgeshort.cli", "export", str(tmp_path), "-o", str(tmp_path / "b")],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert "is not a detection run folder" in out.stderr
    out = subprocess.run([sys.executable, "-m", "edgeshort.cli", "detect", "--demo", "--classes", "b,a", "-o",
                          str(tmp_path / "run")], capture_output=True, text=True)
    assert out.returncode == 2 and "--classes describes your own model and data; the demo's are fixed" in out.stderr
    out = subprocess.run([sys.executable, "-m", "edgeshort.cli", "detect", "--demo", "--classes", "b,a", "--mean", "0.5",
                          "--std", "0.5", "-o", str(tmp_path / "run")], capture_output=True, text=True)
    assert "--classes, --mean and --std describe your own model and data" in out.stderr


def test_detect_flags_reach_every_detector_setting(tmp_path):
    from dataclasses import fields

    from edgeshort.cli import build_parser
    from edgeshort.commands.detect import _channels, config_from_args
    from edgeshort.detect import DetectorConfig
    from edgeshort.errors import InputError

    argv = ["detect", "--model", "m.pt", "-o", "run", "--heatmap", "mean", "--negatives", "closest", "--dfr", "adam",
            "--knn-k", "7", "--min-patches", "3", "--positives", "hottest", "--positive-quantile", "0.99",
            "--cluster-space", "class_centred", "--quiet"]
    config = config_from_args(build_parser(only="detect").parse_args(argv))
    assert (config.heatmap, config.negatives, config.dfr, config.knn_k, config.min_patches) == (
        "mean", "closest", "adam", 7, 3)
    assert (config.positives, config.positive_quantile, config.cluster_space) == ("hottest", 0.99, "class_centred")
    with pytest.raises(InputError, match=r"expected 0 < positive_quantile < 1, got 1.5"):
        config_from_args(build_parser(only="detect").parse_args([*argv[:-1], "--positive-quantile", "1.5"]))
    for text in ("{not json", "[1, 2]"):
        bad = tmp_path / "settings.json"
        bad.write_text(text)
        with pytest.raises(InputError, match=r"cannot read the settings file --config .*pass a JSON object"):
            config_from_args(build_parser(only="detect").parse_args([*argv, "--config", str(bad)]))
    flags = {a.dest for a in build_parser(only="detect")._subparsers._group_actions[0].choices["detect"]._actions}
    assert {f.name for f in fields(DetectorConfig)} - {"progress", "lambdas"} <= flags
    assert _channels("0.5, 0.5,0.5", "--mean") == (0.5, 0.5, 0.5)
    from edgeshort.commands.detect import _crop_pct
    from edgeshort.models.base import KEEP

    assert (_crop_pct("0.875"), _crop_pct("None"), _crop_pct(None)) == (0.875, None, KEEP)
    parsed = build_parser(only="detect").parse_args(["detect", "--model", "m.pt", "-o", "r", "--crop-pct", "0.95",
                                                      "--crop-mode", "squash"])
    assert (parsed.crop_pct, parsed.crop_mode) == ("0.95", "squash")
    with pytest.raises(InputError, match="expected --crop-pct as a fraction such as 0.875, or 'none'"):
        _crop_pct("90%")
    try:
        _channels("half", "--std")
    except InputError as exc:
        assert "expected --std as three numbers R,G,B" in str(exc)
    else:
        raise AssertionError("a malformed --std was accepted")


def test_report_takes_the_eval_listings_headers_as_detect_names_them():
    """detect's verdict advises --eval-columns and, beside it, `edgeshort report RUN --eval TEST`: both spellings work."""
    from edgeshort.cli import build_parser

    parser = build_parser(only="report")
    for flag in ("--columns", "--eval-columns"):
        args = parser.parse_args(["report", "run", "--eval", "test.csv", flag, "group=has_sticker"])
        assert args.columns == "group=has_sticker"
