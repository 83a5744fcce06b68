"""Shared, session-scoped fixtures: the demo data, its tiny ViT, a fitted detector and a bundle.

Built once per test session (the tiny ViT is also cached on disk across sessions), so each
expensive step runs once however many tests use it.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def demo_data():
    from edgeshort.demo import demo_datasets

    return demo_datasets("patch")


@pytest.fixture(scope="session")
def demo_vit(demo_data):
    from edgeshort.demo import demo_model

    return demo_model("patch", demo_data, progress=False)


@pytest.fixture(scope="session")
def demo_result(demo_data, demo_vit, tmp_path_factory):
    """The detector fitted on the demo's validation split and evaluated on its test split."""
    from dataclasses import replace

    from edgeshort.demo import DEMO_DETECTOR
    from edgeshort.detect import ShortcutDetector

    run_dir = tmp_path_factory.mktemp("demo-run")
    result = ShortcutDetector(replace(DEMO_DETECTOR, progress=False)).fit(demo_vit, demo_data["val"], run_dir=run_dir)
    result.evaluate(demo_data["test"])
    return result


@pytest.fixture(scope="session")
def demo_bundle(demo_result, demo_data, tmp_path_factory):
    """The demo run exported to ONNX + OpenVINO IR (parity-checked by the export itself)."""
    from edgeshort.export import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("bundles") / "demo"
    return export_bundle(demo_result, out, ExportOptions(progress=False), calibration=demo_data["val"])


@pytest.fixture(scope="session")
def import_blocker():
    """Source of a script prelude that makes importing the given top-level modules raise.

    The script then imports what it tests; `BLOCKED` stays defined so it can check `sys.modules`.
    """

    def prelude(blocked: set[str]) -> str:
        return (
            "import importlib.abc, sys\n"
            f"BLOCKED = {sorted(blocked)!r}\n"
            "class Blocker(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in BLOCKED:\n"
            "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)  # as if not installed\n"
            "        return None\n"
            "sys.meta_path.insert(0, Blocker())\n"
        )

    return prelude
