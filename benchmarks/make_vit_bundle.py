"""Build a bundle for a random-init torchvision vit_b_16 (224x224), for speed benchmarks.

Random weights are fine for timing; the detector is fitted on a few synthetic images resized to
224 so the bundle has a real key-KNN and DFR head. Usage:

    python benchmarks/make_vit_bundle.py OUT_DIR [--images 48] [--min-patches 2]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch

from edgeshort.data import SyntheticConfig, generate_split
from edgeshort.detect import DetectorConfig, ShortcutDetector
from edgeshort.export import ExportOptions, export_bundle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--int8", action="store_true")
    parser.add_argument("--min-patches", type=int, default=2,
                        help="raw flags that make a shortcut present; set above 196 for a guard that never "
                             "fires, to time the clean-image path of a random-init model")
    args = parser.parse_args()
    from torchvision.models import vit_b_16

    torch.manual_seed(0)
    model = vit_b_16(weights=None, num_classes=2).eval()
    with torch.no_grad():
        model.heads.head.weight.normal_(0, 0.02)
    data_config = SyntheticConfig(image_size=224)
    val = generate_split(replace(data_config, val=replace(data_config.val, size=args.images)), "val")
    t = time.perf_counter()
    result = ShortcutDetector(DetectorConfig(num_selected=8, batch_size=8, min_patches=args.min_patches)).fit(model, val, run_dir=f"{args.out}-run")
    print(f"fit: {time.perf_counter() - t:.1f} s")
    t = time.perf_counter()
    export_bundle(result, args.out, ExportOptions(int8=args.int8, calibration_size=16), calibration=val, overwrite=True)
    print(f"export: {time.perf_counter() - t:.1f} s -> {args.out}")


if __name__ == "__main__":
    main()
