"""`edgeshort report RUN`: the HTML report of a detection run, its pictures in `<stem>_files/` beside it
or, with `--embed`, inside the page."""

from __future__ import annotations

from pathlib import Path

from edgeshort.commands import refuse_without
from edgeshort.commands.detect import CLASS_MAP_HELP, COLUMNS_HELP, IMAGE_ROOT_HELP
from edgeshort.detect.verdict import current_verdict, verdict_line


def add_arguments(parser) -> None:
    parser.add_argument("run", help="run folder written by `edgeshort detect -o RUN` (or `edgeshort demo`)")
    parser.add_argument("-o", "--out", help="HTML file to write (default: RUN/report.html)")
    parser.add_argument("--eval", dest="eval_data",
                        help="test images (an ImageFolder tree, a CSV listing, or ROOT/test for the seed layout): "
                             "evaluate the run on them first (rewrites RUN/metrics.json and RUN/test_predictions.npz), "
                             "then draw the guard's flags on them")
    parser.add_argument("--class-map", help=CLASS_MAP_HELP)
    parser.add_argument("--image-root", help=IMAGE_ROOT_HELP)
    # --eval-columns as detect names it for the same listing: its verdict's advice leads here too.
    parser.add_argument("--columns", "--eval-columns", dest="columns", help=COLUMNS_HELP + " (for --eval)")
    parser.add_argument("--embed", action="store_true",
                        help="put every picture into the HTML as a data URI, writing no <stem>_files/ folder "
                             "(one file to mail or attach)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args) -> int:
    from edgeshort.report import write_report

    test = None
    loose = [flag for flag, value in (("--class-map", args.class_map), ("--image-root", args.image_root),
                                      ("--columns", args.columns)) if value]
    if not args.eval_data:
        refuse_without(loose, "the test images of --eval", "--eval", "--eval TEST_IMAGES")
    if args.eval_data:
        # Evaluation needs the model (torch); reporting alone does not.
        from dataclasses import replace

        from edgeshort.data import load_images, parse_class_map, parse_columns
        from edgeshort.detect import ShortcutDetector

        result = ShortcutDetector.load(args.run)
        class_map = parse_class_map(args.class_map) if args.class_map else None
        columns = parse_columns(args.columns) if args.columns else None
        test = load_images(args.eval_data, result.class_names, class_map, args.image_root, columns)
        result.config = replace(result.config, progress=not args.quiet)
        earlier = result.metrics.get("test_size") and (result.metrics.get("test_source") or "images held in memory",
                                                        result.metrics["test_size"])
        metrics = result.evaluate(test, print_table=True)  # the results, which --quiet (no progress bars) keeps
        if earlier:
            # The run keeps one evaluation: say which one this replaced, so nobody compares against it unawares.
            print(f"replaced the run's earlier evaluation on {earlier[0]} ({earlier[1]} images) in "
                  f"{Path(args.run) / 'metrics.json'}")
        if current_verdict(metrics):
            print(verdict_line(current_verdict(metrics)))
    out = write_report(Path(args.run), args.out, test_dataset=test, embed=args.embed)
    print(f"report: {out}")
    return 0

