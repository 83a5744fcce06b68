"""`edgeshort bench BUNDLE`: latency, throughput, cold start, memory and size of the guarded prediction."""

from __future__ import annotations

from pathlib import Path

DEMO_BUNDLE = "edgeshort-demo/bundle"


def add_arguments(parser) -> None:
    parser.add_argument("bundle", nargs="?", help=f"bundle folder (with --quick, default {DEMO_BUNDLE})")
    parser.add_argument("--backends", default="onnxruntime,openvino", help="comma list (default both)")
    parser.add_argument("--batch", default="1,8", help="comma list of batch sizes (default 1,8)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds per case (default 10, 3 with --quick)")
    parser.add_argument("--block", type=int, help="calls per block (default 5, 3 with --quick)")
    parser.add_argument("--threads", type=int, default=None, help="inference threads (default: the backend's)")
    parser.add_argument("--quick", action="store_true", help="few rounds (3 x 3 calls per case, unless --rounds/--block say otherwise); "
                        "without BUNDLE, the demo's bundle")
    parser.add_argument("--no-seed-pipeline", action="store_true", help="skip the torch + scikit-learn row")
    parser.add_argument("--images", nargs="+", metavar="PATH",
                        help="image files or folders to time (default: the bundle's source run data, if reachable, "
                             "else random images); the guard's own flags sort them into clean and flagged")
    parser.add_argument("-o", "--out", default="bench",
                        help="output folder for bench.json, bench.md and, with edgeshort[report], bench.png "
                             "(default bench)")


def run(args) -> int:
    from edgeshort.bench import bench_bundle, write_outputs
    from edgeshort.errors import InputError

    default = 3 if args.quick else None
    rounds = args.rounds if args.rounds is not None else default or 10
    block = args.block if args.block is not None else default or 5
    try:
        batches = tuple(int(b) for b in args.batch.split(","))
    except ValueError:
        raise InputError(f"expected --batch as a comma list of whole numbers, e.g. 1,8; got {args.batch!r}") from None
    bundle = args.bundle
    if bundle is None and args.quick and Path(DEMO_BUNDLE).is_dir():
        bundle = DEMO_BUNDLE
    if bundle is None:
        raise InputError(
            f"expected a BUNDLE folder (or --quick after `edgeshort demo`, which writes {DEMO_BUNDLE}); "
            "create one with `edgeshort export RUN -o BUNDLE`"
        )
    out, root = Path(args.out).resolve(), Path(bundle).resolve()
    if out == root or root in out.parents:  # checked first: a bench takes minutes
        raise InputError(f"expected --out apart from the bundle folder {bundle!r}, got {args.out!r}: bench's files "
                         "would sit among the bundle's sealed ones; choose another folder (default: bench)")
    results = bench_bundle(
        bundle, [b.strip() for b in args.backends.split(",") if b.strip()],
        batches, rounds, block, args.threads,
        seed_pipeline=not args.no_seed_pipeline, images=args.images,
    )
    paths = write_outputs(results, Path(args.out))
    print((Path(args.out) / "bench.md").read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    if "chart" not in paths:
        print("bench.png not written: matplotlib is not installed (pip install 'edgeshort[report]')")
    return 0
