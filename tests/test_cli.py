"""The command line: light to start, clear about errors."""

from __future__ import annotations

import json
import subprocess
import sys


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


def test_env_prints_versions_and_backends():
    out = subprocess.run([sys.executable, "-m", "edgeshort.cli", "env", "--json"], capture_output=True, text=True,
                         check=True)
    info = json.loads(out.stdout)
    assert info["packages"]["onnxruntime"] and info["packages"]["torch"] and "CPUExecutionProvider" in info["onnxruntime_providers"]
    assert info["openvino_devices"] and "CPU" in info["openvino_devices"]


def test_user_errors_exit_2_with_the_message(tmp_path):
    out = subprocess.run([sys.executable, "-m", "edgeshort.cli", "export", str(tmp_path), "-o", str(tmp_path / "b")],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert "is not a detection run folder" in out.stderr
    out = subprocess.run([sys.executable, "-m", "edgeshort.cli", "detect", "--demo", "--classes", "b,a", "-o",
                          str(tmp_path / "run")], capture_output=True, text=True)
    assert out.returncode == 2 and "--classes orders the classes of --data folders" in out.stderr
