"""`edgeshort export RUN -o BUNDLE`: ONNX + OpenVINO IR graphs, manifest and parity check."""

from __future__ import annotations

from edgeshort.commands import refuse_without
from edgeshort.commands.detect import COLUMNS_HELP, IMAGE_ROOT_HELP
from edgeshort.detect.verdict import verdict_line

EXIT_CODES = """exit codes:
  0  the bundle is written and its parity checked
  2  bad arguments, run or calibration images, a missing extra, or a backend outside the parity
     tolerance: no bundle is written
  4  refused for the run's verdict (none: no shortcut found; harmful: the guard lowers the test set's
     worst group): deploy the model as it is, or pass --ignore-verdict"""


def add_arguments(parser) -> None:
    import argparse

    parser.formatter_class = argparse.RawDescriptionHelpFormatter  # keeps the exit codes' lines
    parser.epilog = EXIT_CODES
    parser.add_argument("run", help="run folder written by `edgeshort detect`")
    parser.add_argument("-o", "--out", required=True, help="bundle folder to write")
    parser.add_argument("--formats", default="onnx,openvino",
                        help="onnx, or onnx,openvino (default; the OpenVINO IR is converted from the ONNX graphs)")
    parser.add_argument("--weights", default="f32", choices=("f32", "fp16"), help="OpenVINO IR weight precision")
    parser.add_argument("--int8", action="store_true",
                        help="also write INT8 guarded and plain graphs (nncf, OpenVINO), checked against f32 on "
                             "calibration images nncf did not see")
    parser.add_argument("--int8-calibration-size", type=int, default=None,
                        help="with --int8: images nncf calibrates on (default 300), evenly spaced over the "
                             "calibration images left once up to 500 (at most half) are held out to check the INT8 "
                             "graphs")
    parser.add_argument("--graphs", default="all", choices=("all", "fused", "split"),
                        help="graphs to ship: all (default), fused (guarded + plain) or split (embed + guard + "
                             "encoder_head); the ONNX graphs share one weights file but each OpenVINO IR holds its "
                             "own, so with OpenVINO fused is about 3/4 and split 1/2 of the size of all (ONNX alone: "
                             "all three about the same)")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="max |logit diff| vs torch (default 1e-4)")
    parser.add_argument("--data", help="calibration images, labels not needed: a folder of images, an ImageFolder tree "
                                       "or a CSV listing (default: the run's validation images)")
    parser.add_argument("--image-root", help=IMAGE_ROOT_HELP)
    parser.add_argument("--columns", help=COLUMNS_HELP)
    parser.add_argument("--no-dfr", action="store_true",
                        help="leave the run's DFR head out: the final label is the ablated prediction")
    parser.add_argument("--ignore-verdict", action="store_true",
                        help="export even when the run's verdict is that no shortcut is found or that the guard harms "
                             "on the test set (the bundle then carries the verdict as a warning)")
    parser.add_argument("--force", action="store_true", help="replace an existing bundle folder")
    parser.add_argument("--quiet", action="store_true", help="no progress output")


def run(args) -> int:
    from edgeshort.data import load_unlabelled, parse_columns
    from edgeshort.export import ExportOptions, export_bundle

    if not args.int8:
        refuse_without(["--int8-calibration-size"] if args.int8_calibration_size is not None else [],
                       "INT8's calibration", "--int8", "--int8")
    int8_options = {} if args.int8_calibration_size is None else {"int8_calibration_size": args.int8_calibration_size}
    options = ExportOptions(
        formats=tuple(f.strip() for f in args.formats.split(",") if f.strip()), weights=args.weights,
        int8=args.int8, tolerance=args.tolerance, progress=not args.quiet, dfr=not args.no_dfr, graphs=args.graphs,
        ignore_verdict=args.ignore_verdict, **int8_options,
    )
    if not args.data:
        refuse_without([flag for flag, value in (("--image-root", args.image_root), ("--columns", args.columns)) if value],
                       "the --data listing", "--data", "--data CALIBRATION.csv",
                       " (the run's own images are found as recorded)")
    columns = parse_columns(args.columns) if args.columns else None
    calibration = load_unlabelled(args.data, args.image_root, columns) if args.data else None
    bundle = export_bundle(args.run, args.out, options, calibration, overwrite=args.force)
    parity = bundle.manifest["parity"]
    print(f"bundle: {bundle.root}")
    if bundle.manifest["guard"].get("verdict"):
        print(verdict_line(bundle.manifest["guard"]["verdict"]))
    for backend, graphs in parity["backends"].items():
        worst = max((v for g in graphs.values() for k, v in g.items() if "logits" in k), default=0.0)
        fp16 = parity.get("openvino_fp16_limits") if backend == "openvino" else None
        limit = f"FP16 weights, limit {fp16['tolerance']:g}" if fp16 else f"tolerance {parity['tolerance']:g}"
        print(f"  parity {backend:<12} max |logit diff| {worst:.2e} ({limit})")
    files = bundle.manifest["files"]
    total = sum(entry["bytes"] for entry in files.values())
    print(f"  files: {len(files)}, {total / 2**20:.1f} MiB: "
          + ", ".join(f"{name} {entry['bytes'] / 2**20:.1f}" for name, entry in files.items()))
    int8 = (bundle.manifest.get("openvino") or {}).get("int8")
    if int8:
        seen = "held-out" if int8["check_held_out"] else "calibration (too few to hold any out)"
        print(f"  INT8 ({', '.join(int8['graphs'])}, nncf on {int8['calibration_size']} images) against the f32 ONNX "
              f"graphs on {int8['check_size']} {seen} images: final label {int8['final_label_agreement']:.1%}, "
              f"plain label {int8['plain_label_agreement']:.1%}, shortcut present {int8['present_agreement']:.1%}, "
              f"flags {int8['flag_agreement']:.1%} the same; max |logit diff| {int8['max_abs_logit_diff']:.2g}")
        if int8["warning"]:
            print(f"  WARNING: {int8['warning']}")
    guard = bundle.manifest["guard"]
    print("  final label: " + ("ablated + DFR head" if guard["has_dfr"] else "ablated prediction"
                               + (" (the run's DFR head left out by --no-dfr)" if guard["dfr_omitted"] else "")))
    verdict = (guard.get("verdict") or {}).get("summary")
    for warning in guard["warnings"]:
        if warning != verdict:  # an unconfirmed verdict the bundle carries as a warning is printed above
            print(f"  WARNING from the detection run: {warning}")
    return 0
