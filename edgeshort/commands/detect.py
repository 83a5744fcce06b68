"""`edgeshort detect`: find the shortcut a ViT learned on a labelled validation set."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

from edgeshort.commands import options_describe, refuse_without
from edgeshort.detect.config import (
    CLUSTER_SPACES,
    DEMO_DETECTOR,
    DFR_METHODS,
    HEATMAP_CONTRASTS,
    NEGATIVE_CHOICES,
    POSITIVE_CHOICES,
    SALIENCY_CONTRASTS,
    SETTING_NOTES,
    DetectorConfig,
)
from edgeshort.detect.verdict import current_verdict, verdict_line
from edgeshort.errors import InputError
from edgeshort.runtime.preprocess import CROP_MODES, INTERPOLATIONS

IMAGE_ROOT_HELP = ("folder the CSV listing's image paths are relative to (default: the CSV's folder), e.g. ISIC's "
                   "image folder beside its ground-truth CSV")
COLUMNS_HELP = ("the CSV listing's headers by role where the defaults do not recognise them, ROLE=HEADER pairs "
                "(roles image, label, group, mask), e.g. image=file_name,label=finding,group=has_ruler")
CLASS_MAP_HELP = ("merge the data's classes into the model's, DATA=MODEL pairs, e.g. MEL=malignant,NV=benign,"
                  "BKL=benign (every class with images must be mapped)")
# The settings that take a word, not a number.
CHOICES = {"dfr": DFR_METHODS, "heatmap": HEATMAP_CONTRASTS, "negatives": NEGATIVE_CHOICES,
           "cluster_space": CLUSTER_SPACES, "positives": POSITIVE_CHOICES, "saliency": SALIENCY_CONTRASTS}


def add_arguments(parser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="model file: a saved module, an edgeshort checkpoint, or a state dict or training "
                          "checkpoint ({'state_dict': ...}, timm's train.py) with --arch")
    src.add_argument("--demo", nargs="?", const="patch", choices=("patch", "ruler"),
                     help="use the built-in synthetic data and tiny ViT (artefact kind, default patch); its "
                          "settings, unless given: " + ", ".join(
                              f"{f.name}={getattr(DEMO_DETECTOR, f.name)!r}" for f in fields(DetectorConfig)
                              if getattr(DEMO_DETECTOR, f.name) != getattr(DetectorConfig(), f.name)))
    parser.add_argument("--arch", help="architecture of a state-dict file, e.g. torchvision:vit_b_16 or timm:NAME")
    parser.add_argument("--img-size", help="input size the state dict was fine-tuned at, N or HxW (default: read "
                                           "from its position embeddings when square, else the architecture's)")
    parser.add_argument("--data", help="validation images: an ImageFolder tree, a CSV listing images and labels "
                        "(path,label[,group][,mask], or ISIC's one-hot ground truth), or ROOT/val for the seed layout")
    parser.add_argument("--eval", dest="eval_data", help="test images to evaluate on (same forms as --data)")
    parser.add_argument("--image-root", help=IMAGE_ROOT_HELP)
    parser.add_argument("--columns", help=COLUMNS_HELP + " (for --data)")
    parser.add_argument("--eval-columns", help="the same for the --eval listing, which may have other headers")
    parser.add_argument("--eval-class-map", help="--class-map for the --eval listing alone (default: --class-map), "
                                                 "e.g. naevus=nevus where it spells one class otherwise; classes it "
                                                 "names as the validation data does need no entry")
    parser.add_argument("--classes", help="comma list of the model's classes in its output order, named as the "
                                          "class folders or --class-map targets (default: sorted, as torchvision's "
                                          "ImageFolder)")
    parser.add_argument("--class-map", help=CLASS_MAP_HELP)
    parser.add_argument("-o", "--out", required=True, help="run folder to write")
    parser.add_argument("--config", help="JSON file of detector settings (see DetectorConfig)")
    for f in fields(DetectorConfig):
        if f.name in ("progress", "lambdas"):
            continue
        choices = CHOICES.get(f.name)
        kind = str if choices else float if isinstance(f.default, float) else int
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=kind, choices=choices,
                            default=None, help=f"{SETTING_NOTES[f.name]} (default {f.default!r})")
    parser.add_argument("--mean", help="normalisation mean the model was trained with, R,G,B in [0, 1] "
                                       "(default: the model family's)")
    parser.add_argument("--std", help="normalisation std the model was trained with, R,G,B (default: the family's)")
    parser.add_argument("--interpolation", choices=sorted(INTERPOLATIONS), help="resize filter (default: the family's)")
    parser.add_argument("--crop-pct", help="keep the aspect ratio and take a centre crop of this share, as timm and "
                                           "torchvision evaluate (Resize(256) + CenterCrop(224) is 0.875); 'none' "
                                           "stretches the whole image (default: the family's; timm's own)")
    parser.add_argument("--crop-mode", choices=CROP_MODES, help="with --crop-pct: keep the aspect ratio (center) or "
                                                                "stretch before cropping (squash), as timm's crop modes")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def config_from_args(args, base: DetectorConfig | None = None) -> DetectorConfig:
    data = (base or DetectorConfig()).to_dict()
    if args.config:
        try:
            settings = json.loads(Path(args.config).read_text())
        except (OSError, ValueError) as exc:
            settings = exc
        if not isinstance(settings, dict):
            raise InputError(f"cannot read the settings file --config {args.config!r} ({settings}); pass a JSON "
                             "object of detector settings, e.g. a run's config.json")
        data.update(settings)
    for f in fields(DetectorConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            data[f.name] = value
    data["progress"] = not args.quiet
    return DetectorConfig.from_dict(data)


def run(args) -> int:
    from edgeshort.data import load_images, parse_class_map, parse_columns
    from edgeshort.data.dataset import in_model_class_order
    from edgeshort.detect import ShortcutDetector
    from edgeshort.models import load_adapter_file

    if args.demo:
        from edgeshort.demo import demo_datasets, demo_model

        fixed = [flag for flag, value in (("--classes", args.classes), ("--class-map", args.class_map),
                                          ("--image-root", args.image_root), ("--columns", args.columns),
                                          ("--eval-columns", args.eval_columns),
                                          ("--eval-class-map", args.eval_class_map),
                                          ("--img-size", args.img_size),
                                          ("--mean", args.mean), ("--std", args.std),
                                          ("--interpolation", args.interpolation), ("--crop-pct", args.crop_pct),
                                          ("--crop-mode", args.crop_mode))
                 if value]
        if fixed:
            raise InputError(f"{options_describe(fixed)} your own model and data; the demo's are fixed")

        datasets = demo_datasets(args.demo)
        model = demo_model(args.demo, datasets, progress=not args.quiet)
        val, test = datasets["val"], datasets["test"]
        config = config_from_args(args, DEMO_DETECTOR)
    else:
        if not args.data:
            raise InputError("expected --data VAL with --model; pass the validation image folder or CSV listing")
        model = load_adapter_file(args.model, arch=args.arch, image_size=_image_size(args.img_size),
                                  progress=not args.quiet).set_preprocessing(
            _channels(args.mean, "--mean"), _channels(args.std, "--std"), args.interpolation, _crop_pct(args.crop_pct),
            args.crop_mode,
        )
        classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
        class_map = parse_class_map(args.class_map) if args.class_map else None
        columns = parse_columns(args.columns) if args.columns else None
        val = load_images(args.data, classes, class_map, args.image_root, columns)
        if classes is None:
            val, reordered = in_model_class_order(val, model.class_names)
            if reordered:
                classes = list(val.class_names)
                print(f"classes in the model's output order (its id2label): {', '.join(classes)}")
        if not args.eval_data:
            refuse_without(["--eval-columns"] if args.eval_columns else [], "the headers of the --eval listing",
                           "--eval", "--eval TEST")
            refuse_without(["--eval-class-map"] if args.eval_class_map else [], "the classes of the --eval listing",
                           "--eval", "--eval TEST")
        eval_columns = parse_columns(args.eval_columns) if args.eval_columns else None
        eval_class_map = parse_class_map(args.eval_class_map) if args.eval_class_map else class_map
        # In the validation data's class order, so a class it does not know stops the run before the fit.
        test = _eval_images(args, list(val.class_names), eval_class_map, eval_columns) if args.eval_data else None
        config = config_from_args(args)
    result = ShortcutDetector(config).fit(model, val, run_dir=args.out)
    print(result.summary(verdict=test is None))  # with a test set, the verdict comes once, after it
    if test is not None:
        result.evaluate(test, print_table=True)
    _print_headline(result.metrics)
    from edgeshort.report.html import write_report

    page = write_report(args.out, test_dataset=test)
    print(f"run folder: {args.out}\nreport: {page}")
    return 0


def _eval_images(args, class_names: list[str], class_map, columns):
    from edgeshort.data import load_images

    try:
        return load_images(args.eval_data, class_names, class_map, args.image_root, columns)
    except InputError as error:
        raise InputError(f"--eval: {error}. For the --eval listing alone: --eval-class-map "
                         "LABEL=CLASS,... (classes it names as the validation data does need no entry)") from None


def _channels(text: str | None, flag: str) -> tuple[float, float, float] | None:
    """'0.5,0.5,0.5' -> (0.5, 0.5, 0.5); Preprocessing checks the values."""
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise InputError(f"expected {flag} as three numbers R,G,B, e.g. 0.5,0.5,0.5; got {text!r}") from None


def _image_size(text: str | None) -> int | tuple[int, int] | None:
    """'384' -> 384, '384x512' -> (384, 512): height by width, as timm's img_size."""
    if text is None:
        return None
    parts = text.lower().replace(",", "x").split("x")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        sizes = []
    if len(sizes) not in (1, 2) or min(sizes) < 1:
        raise InputError(f"expected --img-size as N or HxW in pixels, e.g. 384 or 384x512; got {text!r}")
    return sizes[0] if len(sizes) == 1 else (sizes[0], sizes[1])


def _crop_pct(text: str | None):
    """'0.875' -> 0.875, 'none' -> None (stretch), absent -> keep the family's; Preprocessing checks the range."""
    from edgeshort.models.base import KEEP

    if text is None:
        return KEEP
    if text.strip().lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise InputError(f"expected --crop-pct as a fraction such as 0.875, or 'none' to stretch; got {text!r}") from None


def _print_headline(metrics: dict) -> None:
    keys = ("shortcut_cluster_group_purity", "patch_precision", "patch_recall", "wga_original", "wga_ablated",
            "wga_dfr")
    shown = [f"{k}={metrics[k]:.3f}" for k in keys if metrics.get(k) is not None]
    if shown:
        print("  ".join(shown))
    if current_verdict(metrics):  # it closes the output, settled by a test set or not
        print(verdict_line(current_verdict(metrics)))
    if metrics.get("test_size") is None:
        print("no test set: add --eval TEST (or later: edgeshort report RUN --eval TEST) to measure per-group accuracy "
              "and, with artefact labels, settle the verdict")
