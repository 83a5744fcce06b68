"""Image preprocessing in numpy + Pillow, matching torchvision's Resize/CenterCrop/ToTensor/Normalize.

Written against Pillow rather than imported from torchvision or timm, which need torch, and the
runtime must run without it. Shared by the offline stage and the runtime so both feed the model
identical arrays. Resizing goes through Pillow exactly as torchvision does for PIL images, so
the two agree to float rounding. Two geometries: stretch the whole image to the input size (the
seed notebook's `Resize((224, 224))`), or timm's and torchvision's evaluation transform, which
resizes and takes a centre crop (`crop_pct`; torchvision's `Resize(256)` + `CenterCrop(224)` is
`crop_pct=0.875`).
"""

from __future__ import annotations

import io
import math
import numbers
import os
import re
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from edgeshort.errors import ImageLoadError, InputError

INTERPOLATIONS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}
CROP_MODES = ("center", "squash")
# Bounds that no ViT comes near (the largest take 1024 px, timm crops at 0.875 to 1), so a value
# beyond them is a mistake rather than a model, caught before it allocates gigabytes.
MAX_INPUT_SIDE = 4096
MIN_CROP_PCT = 0.1
DEFAULT_MAX_PIXELS = 50_000_000
# Below this many pixels an in-memory image preprocesses faster than a thread pool hands it over
# (measured on 2 cores, eight images: 64x64 0.5 ms serial vs 1.1 ms threaded; 512x512 7.9 vs 4.8 ms).
THREADED_MIN_PIXELS = 256 * 256
# File suffixes treated as images when a folder is searched.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
LISTING_SUFFIXES = (".csv", ".tsv", ".txt", ".json", ".jsonl")


@dataclass
class FolderContents:
    """What a folder search found. Only `images` are used; everything else is kept so it can be reported."""

    images: list[Path] = field(default_factory=list)
    others: list[Path] = field(default_factory=list)  # files whose suffix is not an image's
    hidden: list[Path] = field(default_factory=list)  # names starting with "." (not searched further)
    repeated: list[Path] = field(default_factory=list)  # links to a folder already searched
    problems: list[tuple[Path, str]] = field(default_factory=list)  # (path, why it cannot be used)
    folders: list[Path] = field(default_factory=list)  # the real folders searched, links resolved
    linked_images: list[Path] = field(default_factory=list)  # real files behind image links


def search_folder(folder: Path, recursive: bool = True) -> FolderContents:
    """Image files in `folder` by suffix (as torchvision's ImageFolder), in sorted order, and what was left out.

    Links to folders are followed, as torchvision's `os.walk(followlinks=True)` does, and each real
    folder is searched once, so a link loop ends. Hidden files and folders (.DS_Store, macOS's ._
    copies, .ipynb_checkpoints) are not images, and ._x.jpg would not even load: they are listed
    in `hidden`. A folder that cannot be listed, a broken link and a non-regular file (FIFO,
    socket) with an image suffix are `problems`, so none vanishes unnoticed.
    """
    contents = FolderContents()
    searched: set[tuple[int, int]] = set()
    pending = [Path(folder)]
    while pending:
        directory = pending.pop()
        try:
            stat = directory.stat()
            if (stat.st_dev, stat.st_ino) in searched:
                contents.repeated.append(directory)
                continue
            searched.add((stat.st_dev, stat.st_ino))
            with os.scandir(directory) as scan:
                entries = sorted(scan, key=lambda entry: entry.name)
        except OSError as exc:
            contents.problems.append((directory, f"cannot search the folder {str(directory)!r} "
                                                 f"({exc.strerror or exc}); make it readable, or leave it out"))
            continue
        contents.folders.append(directory.resolve())
        subfolders = []
        for entry in entries:
            path = directory / entry.name
            if entry.name.startswith("."):
                contents.hidden.append(path)
                continue
            if _is_dir(entry):
                subfolders.append(path)
                continue
            is_image = path.suffix.lower() in IMAGE_SUFFIXES
            if _is_file(entry):
                (contents.images if is_image else contents.others).append(path)
                if is_image and entry.is_symlink():
                    contents.linked_images.append(path.resolve())
            elif not is_image:
                contents.others.append(path)
            elif entry.is_symlink() and not os.path.exists(path):  # False, not an error, where it cannot look
                contents.problems.append((path, f"{str(path)!r} is a link that cannot be followed "
                                                f"({_link_problem(path)}); fix the link or remove it"))
            else:
                contents.problems.append((path, _not_regular_file(path)))
        if recursive:
            pending.extend(reversed(subfolders))  # depth first, in sorted order
    contents.images.sort()
    contents.others.sort()
    return contents


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows a link
    except OSError:
        return False


def _is_file(entry: os.DirEntry) -> bool:
    try:
        return entry.is_file()
    except OSError:
        return False


def _not_regular_file(path: Path) -> str:
    link = f" (a link to {os.readlink(path)!r})" if path.is_symlink() else ""
    return f"{str(path)!r}{link} is not a regular file but a FIFO, socket or device; copy the image to a file"


def _link_problem(path: Path) -> str:
    """Why a link cannot be followed: its target is missing, or it loops."""
    try:
        target = os.readlink(path)
    except OSError as exc:
        return exc.strerror or str(exc)
    try:
        path.stat()
    except OSError as exc:
        return f"{exc.strerror or exc}: {target!r}"
    return f"target {target!r}"


def list_image_files(folder: Path, recursive: bool = False) -> tuple[list[Path], list[Path]]:
    """Image files in `folder` and the other files, as `search_folder` finds them (hidden ones in neither).

    A folder that cannot be searched or a broken image link raises: a data set must not lose images unnoticed."""
    contents = search_folder(folder, recursive)
    if contents.problems:
        shown = "; ".join(problem for _, problem in contents.problems[:3])
        count = len(contents.problems)
        more = f" ({count - 3} more not shown)" if count > 3 else ""
        raise InputError(f"cannot use {count} entr{'y' if count == 1 else 'ies'} under {str(folder)!r}{more}: {shown}")
    return contents.images, contents.others


def _numbers(values, kind) -> tuple | None:
    """`values` (a sequence or array) as a tuple when every item is a number of `kind` (bools are not), else None."""
    if isinstance(values, (str, bytes)):
        return None
    try:
        items = tuple(np.asarray(values).reshape(-1).tolist()) if isinstance(values, np.ndarray) else tuple(values)
    except TypeError:
        return None
    if not all(isinstance(v, kind) and not isinstance(v, (bool, np.bool_)) for v in items):
        return None
    return items


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the model's input: resize (and crop) to `size` (H, W), scale to [0, 1], normalise.

    `crop_pct` None stretches the whole image to `size`. A fraction in [0.1, 1] resizes the image
    to `size / crop_pct` and cuts out the centre `size`, in one of timm's two crop modes:
    "center" (its default, and torchvision's Resize + CenterCrop) keeps the aspect ratio,
    "squash" stretches to `size / crop_pct` first.
    """

    size: tuple[int, int]
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"
    crop_pct: float | None = None
    crop_mode: str = "center"

    def __post_init__(self) -> None:
        # Stored as Python numbers whatever came in (numpy scalars or arrays), so runs and bundles write them as JSON.
        size = _numbers(self.size, numbers.Integral)
        if size is None or len(size) != 2 or not all(0 < v <= MAX_INPUT_SIDE for v in size):
            raise InputError(f"expected size as (height, width), two whole numbers from 1 to {MAX_INPUT_SIDE}, got "
                             f"{self.size!r}; give the model's input size, e.g. (224, 224)")
        object.__setattr__(self, "size", tuple(int(v) for v in size))
        if self.crop_mode not in CROP_MODES:
            raise InputError(f"expected crop_mode in {CROP_MODES}, got {self.crop_mode!r}")
        if self.crop_pct is not None:
            crop = _numbers([self.crop_pct], numbers.Real)
            if crop is None or not MIN_CROP_PCT <= crop[0] <= 1:
                raise InputError(
                    f"expected crop_pct as a fraction in [{MIN_CROP_PCT}, 1] or None (stretch the whole image), got "
                    f"{self.crop_pct!r}; torchvision's Resize(256) + CenterCrop(224) is 0.875"
                )
            object.__setattr__(self, "crop_pct", float(crop[0]))
        for name in ("mean", "std"):
            values = _numbers(getattr(self, name), numbers.Real)
            if values is None or len(values) != 3 or not all(np.isfinite(v) for v in values):
                raise InputError(f"expected {name} as three finite numbers (R, G, B), got {getattr(self, name)!r}")
            object.__setattr__(self, name, tuple(float(v) for v in values))
        if min(self.std) <= 0:
            raise InputError(f"expected a positive std for every channel, got {self.std!r}")
        if min(self.mean) < 0 or max(self.mean) > 1 or max(self.std) > 1:
            # Pixels are scaled to [0, 1] first (as torchvision's ToTensor), so a statistic outside it is on 0-255.
            raise InputError(
                f"expected mean and std on the 0-1 pixel scale (ImageNet's mean is 0.485,0.456,0.406), got mean "
                f"{self.mean!r} and std {self.std!r}; values from the 0-255 scale are divided by 255"
            )
        if self.interpolation not in INTERPOLATIONS:
            raise InputError(
                f"expected interpolation in {sorted(INTERPOLATIONS)}, got {self.interpolation!r}; "
                "pick one of those"
            )

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> Preprocessing:
        return cls(
            size=tuple(data["size"]),
            mean=tuple(data["mean"]),
            std=tuple(data["std"]),
            interpolation=data["interpolation"],
            crop_pct=data.get("crop_pct"),  # absent from runs and bundles that only stretched
            crop_mode=data.get("crop_mode", "center"),
        )

    def _resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) of the image before the centre crop, rounded as timm and torchvision round."""
        target_h, target_w = (math.floor(side / self.crop_pct) for side in self.size)
        if self.crop_mode == "squash":
            return target_w, target_h
        if target_h == target_w:
            # torchvision's Resize(int): the shorter side to the target, the longer in proportion (truncated).
            if width <= height:
                return target_w, int(target_w * height / width)
            return int(target_h * width / height), target_h
        # timm's ResizeKeepRatio for a non-square input: the smaller ratio wins, then round.
        ratio = min(height / target_h, width / target_w)
        return round(width / ratio), round(height / ratio)

    def _centre_crop(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of the centre `size` in a (width, height) image, as torchvision's CenterCrop."""
        h, w = self.size
        top, left = int(round((height - h) / 2.0)), int(round((width - w) / 2.0))
        return left, top, left + w, top + h

    def crop_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """(left, top, right, bottom) of the part of a (width, height) image the model sees, in its pixels."""
        if self.crop_pct is None:
            return 0.0, 0.0, float(width), float(height)
        resized_w, resized_h = self._resized_size(width, height)
        left, top, right, bottom = self._centre_crop(resized_w, resized_h)
        sx, sy = width / resized_w, height / resized_h
        return left * sx, top * sy, right * sx, bottom * sy

    def enlargement(self, width: int, height: int) -> float:
        """How many-fold a (width, height) image is enlarged on its way to the model (below 1: shrunk)."""
        left, top, right, bottom = self.crop_box(width, height)
        h, w = self.size
        return max(w / (right - left), h / (bottom - top))

    def seen_part(self, img: Image.Image) -> Image.Image:
        """The part of `img` the model sees, at the image's own resolution (all of it unless cropping)."""
        if self.crop_pct is None:
            return img
        return img.crop(tuple(int(round(v)) for v in self.crop_box(*img.size)))

    def model_view(self, img: Image.Image, resample: Image.Resampling | None = None) -> Image.Image:
        """The image as the model sees it, before normalisation: `size` (H, W) pixels.

        `resample` overrides the interpolation (NEAREST for masks)."""
        h, w = self.size
        resample = INTERPOLATIONS[self.interpolation] if resample is None else resample
        if self.crop_pct is None:
            return img if img.size == (w, h) else img.resize((w, h), resample)
        resized = self._resized_size(*img.size)
        if resized != img.size:
            img = img.resize(resized, resample)
        return img.crop(self._centre_crop(*img.size))


def pillow_pixel_limit() -> int | None:
    """The size above which Pillow itself refuses an image as a decompression bomb (twice
    PIL.Image.MAX_IMAGE_PIXELS; None where that is lifted), whatever max_pixels says."""
    return None if Image.MAX_IMAGE_PIXELS is None else 2 * int(Image.MAX_IMAGE_PIXELS)


def check_max_pixels(max_pixels) -> None:
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise InputError(f"expected max_pixels to be a positive integer, got {max_pixels!r}")
    limit = pillow_pixel_limit()
    if limit is not None and max_pixels > limit:
        raise InputError(
            f"expected max_pixels of at most {limit:,}, Pillow's own decompression-bomb limit, got {max_pixels:,}: "
            "Pillow would refuse the larger images anyway. To read them, lift its limit in Python first "
            "(PIL.Image.MAX_IMAGE_PIXELS = None, or a larger number) and pass max_pixels"
        )


def _pixel_limit_error(source: str, width: int, height: int, max_pixels: int) -> ImageLoadError:
    return ImageLoadError(
        f"expected an image of at most {max_pixels:,} pixels, got {source} with {width}x{height} = "
        f"{width * height:,}; downscale it first, or raise max_pixels (--max-pixels) if you trust the file"
    )


# A scheme of two letters or more: "C://x.png" is a Windows path.
URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+://")


def load_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open an image file as RGB, refusing missing, corrupt and oversized (decompression bomb) files.

    The size check reads only the header, so an oversized file is refused before it is decoded.
    """
    if isinstance(path, str) and URL.match(path):  # Path() would fold the slashes into a missing file's name
        raise ImageLoadError(f"expected an image file, got the URL {path!r}; images are read from files, not "
                             "downloaded: fetch it first and pass the file (or its bytes)")
    path = Path(path)
    if path.is_dir():
        raise ImageLoadError(f"expected an image file, got the folder {str(path)!r}; pass the files in it")
    if not path.is_file():
        if path.exists():  # a FIFO or device: reading it could block for ever or never end
            raise ImageLoadError(_not_regular_file(path))
        raise ImageLoadError(f"image file {str(path)!r} does not exist; check the path")
    try:
        return _decode(path, repr(str(path)), max_pixels, f"image {str(path)!r}")
    except ImageLoadError as exc:
        if path.suffix.lower() in LISTING_SUFFIXES:  # a listing passed where images are read
            raise ImageLoadError(f"{exc}. {path.name!r} looks like a listing, and images are read only from image "
                                 "files and folders here: pass the images or their folder") from exc
        raise


def _decode(file: Path | Any, source: str, max_pixels: int, named: str | None = None) -> Image.Image:
    """A path or binary file object -> RGB image; the size check reads only the header, before decoding.

    `source` names the image in errors, `named` in "cannot read ..." (default: `source`)."""
    try:
        with Image.open(file) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise _pixel_limit_error(source, width, height, max_pixels)
            _check_one_picture(img, source)
            high_bytes_only = _sixteen_bit_as_eight(img)
            img.load()
            if high_bytes_only:
                _check_high_bytes(img, source)
            return to_rgb(img, source=source)
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as exc:
        # Pillow's own limit (about 179 million pixels) fires inside Image.open, before ours can.
        raise ImageLoadError(
            f"expected an image of at most {min(max_pixels, pillow_pixel_limit() or max_pixels):,} pixels (Pillow's "
            f"decompression-bomb limit caps max_pixels), got {source}, which Pillow refuses ({exc}); downscale it first"
        ) from exc
    except Exception as exc:  # Pillow raises several unrelated types for broken files
        if _empty(file):  # Pillow's "cannot identify image file" hides that nothing is there to identify
            named = named or source
            size = "" if named.endswith("(0 bytes)") else " (0 bytes)"
            raise ImageLoadError(f"cannot read {named}: it is empty{size}; expected a PNG/JPEG (or "
                                 "other Pillow-readable) file; an empty file is often a copy or download that did "
                                 "not finish: copy it again") from exc
        raise _unreadable(named or source, exc) from exc


def _empty(file: Path | Any) -> bool:
    try:
        if isinstance(file, Path):
            return file.stat().st_size == 0
        if isinstance(file, io.BytesIO):
            return file.getbuffer().nbytes == 0
        return os.fstat(file.fileno()).st_size == 0  # an open file; other streams cannot tell
    except (OSError, AttributeError, ValueError, io.UnsupportedOperation):
        return False


# Raw modes of 16 bits per sample: not "BGR;16", a 5-6-5 BMP's 16 bits per pixel.
SIXTEEN_BIT_SAMPLES = re.compile(r"(RGB|RGBA|RGBX|LA);16[BLN]?")


def _sixteen_bit_as_eight(img: Image.Image) -> bool:
    """Whether Pillow decodes this file's 16-bit colour (or gray + alpha) samples to 8 bits: it keeps only each
    value's high byte (raw mode "RGB;16B" and the like). Known only before decoding, from the file's tiles."""
    if img.mode not in ("RGB", "RGBA", "LA"):
        return False
    for tile in getattr(img, "tile", None) or ():
        raw = tile[3] if len(tile) > 3 else None  # (codec, extents, offset, args): args is the raw mode, or leads
        raw = raw[0] if isinstance(raw, tuple) and raw else raw
        if isinstance(raw, str) and SIXTEEN_BIT_SAMPLES.fullmatch(raw):
            return True
    return False


# High bytes under this (16-bit values under 4,096) hold data of 12 bits or fewer, stored in 16.
SIXTEEN_BIT_DARK = 16


def _check_high_bytes(img: Image.Image, source: str) -> None:
    """Refuse a 16-bit colour image Pillow's high bytes turn almost black: 12-bit data (a scanner's, an X-ray
    camera's) stored in 16 bits reaches at most 15 of 255, and 8-bit values stored in 16 bits reach 0."""
    colour = img.getextrema()[: 1 if img.mode == "LA" else 3]
    brightest = max(high for _, high in colour)
    if brightest < SIXTEEN_BIT_DARK:
        raise ImageLoadError(
            f"{source} holds 16 bits per sample (read as {img.mode}) and its values fit in 12 bits: Pillow (as the usual "
            f"torchvision pipeline) keeps only each value's high byte, which reaches {brightest} of 255 here, so the "
            "model would see an almost black image. Convert the images to 8-bit the way the model's training images "
            "were (e.g. x * 255 / 4095 for 12-bit data, or x.astype(np.uint8) for 8-bit values stored in 16 bits) "
            "and save them as PNG or JPEG"
        )


def _check_one_picture(img: Image.Image, source: str) -> None:
    """Refuse a file of several pictures the model would see only the first of: a TIFF stack or an animation,
    whose frames share the first one's size. Smaller later frames are previews of the first (a scanner's
    TIFF thumbnail, a pyramid's levels), as are a phone JPEG's (MPO)."""
    frames = getattr(img, "n_frames", 1)
    if frames < 2 or img.format == "MPO":
        return
    size = img.size
    try:
        for i in range(1, frames):
            img.seek(i)
            if img.size == size:
                raise ImageLoadError(
                    f"{source} holds {frames} {img.format or ''} frames (pages) of the same size, a stack or an "
                    "animation, and the model sees one image per file; save each frame to predict as a file of its "
                    "own (Pillow: img.seek(i); img.save(...))"
                )
    finally:
        img.seek(0)


def _unreadable(named: str, exc: Exception) -> ImageLoadError:
    return ImageLoadError(
        f"cannot read {named} ({type(exc).__name__}: {exc}); expected a valid PNG/JPEG "
        "(or other Pillow-readable) file; check the file or re-save it"
    )


def to_rgb(img: Image.Image, source: str = "image") -> Image.Image:
    """Grayscale, palette and RGBA images become RGB with Pillow's `convert("RGB")` (alpha is dropped),
    exactly what the usual torchvision pipeline `Image.open(p).convert("RGB")` does."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16") and img.mode != "I;16":
        img = img.convert("I")  # the byte-order variants of 16-bit TIFFs; Pillow reads their range only as "I"
    if img.mode in ("I", "I;16", "F"):
        _check_8bit_range(img, source)
    if img.mode in ("L", "LA", "P", "PA", "RGBA", "RGBX", "CMYK", "YCbCr", "I", "I;16", "F", "1"):
        try:
            return img.convert("RGB")
        except (ValueError, OSError) as exc:  # e.g. a palette image whose palette is damaged
            raise ImageLoadError(f"{source} (mode {img.mode!r}) cannot be converted to RGB ({exc}); re-save it as RGB") from exc
    raise ImageLoadError(
        f"{source}: expected an RGB, RGBA or grayscale image, got mode {img.mode!r}; convert it to RGB first"
    )


def eight_bit_rule(low: float, high: float) -> str:
    """How to bring values from `low` to `high` to 0..255: one rule for the whole set, since scaling each
    image by its own maximum would change every image's contrast."""
    if 0 <= low and high <= 255:
        return "x.astype(np.uint8): the values already fit"
    if low >= 0:
        return ("one fixed factor for all, e.g. x * 255 / 65535 for 16-bit or x * 255 / 4095 for 12-bit data, "
                "not each by its own maximum")
    return "one fixed window for all (e.g. a CT window), mapped to 0..255, not each by its own range"


def _check_8bit_range(img: Image.Image, source: str) -> None:
    """16-bit, 32-bit and float images (radiographs, scientific TIFFs) convert to RGB by clipping at
    255: a 16-bit X-ray turns white and a [0, 1] float image black, silently. Refuse those."""
    if img.mode == "F":
        values = np.asarray(img)
        if not np.isfinite(values).all():  # NaN would also hide the range from Pillow's extrema
            raise ImageLoadError(f"{source} is a float image with NaN or infinite pixels, which have no colour; "
                                 "replace them (e.g. with the background value) and save it as 8-bit PNG or JPEG")
        low, high = float(values.min()), float(values.max())
    else:
        low, high = img.getextrema()
    if low < 0 or high > 255:
        raise ImageLoadError(
            f"{source} is a {img.mode!r} (16/32-bit or float) image with values {low:g} to {high:g}; converting it to "
            "RGB would clip them to 0..255 (values above 255 turn white). Convert the images to 8-bit the way the "
            f"model's training images were ({eight_bit_rule(low, high)}) and save them as PNG or JPEG"
        )
    if img.mode == "F" and 0 < high <= 1:
        raise ImageLoadError(
            f"{source} is a float image with values {low:g} to {high:g}; as RGB it would be almost black. "
            "Scale it to 0..255 (x * 255) and save it as 8-bit PNG or JPEG"
        )


def array_to_image(array: np.ndarray, source: str = "array", max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """An HxW, HxWx1, HxWx3 or HxWx4 uint8 array -> RGB PIL image (alpha dropped, as for files)."""
    if not isinstance(array, np.ndarray):
        raise InputError(f"{source}: expected a numpy array, got {type(array).__name__}")
    if array.dtype != np.uint8:
        raise InputError(
            f"{source}: expected a uint8 HxWxC image array, got dtype {array.dtype}; convert with "
            "(x * 255).clip(0, 255).astype(np.uint8), or pass a preprocessed float32 (3, H, W) array"
        )
    if array.ndim not in (2, 3):
        raise InputError(
            f"{source}: expected an image array of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), "
            f"got {array.ndim}-D shape {array.shape}; pass one image per array (or a list)"
        )
    if array.ndim == 3 and array.shape[2] not in (1, 3, 4):
        raise InputError(
            f"{source}: expected 1, 3 or 4 channels (last axis), got {array.shape[2]} in shape {array.shape}; "
            "channels go last in uint8 image arrays"
        )
    if min(array.shape[:2]) < 1:
        raise InputError(f"{source}: expected a non-empty image, got shape {array.shape}")
    height, width = array.shape[:2]
    if width * height > max_pixels:
        raise _pixel_limit_error(source, width, height, max_pixels)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2:
        return Image.fromarray(np.ascontiguousarray(array)).convert("RGB")
    return Image.fromarray(np.ascontiguousarray(array[:, :, :3]))


def preprocess_image(img: Image.Image, prep: Preprocessing) -> np.ndarray:
    """One RGB PIL image -> normalised float32 (3, H, W)."""
    x = np.asarray(prep.model_view(img), dtype=np.float32) / np.float32(255.0)
    x = (x - np.asarray(prep.mean, np.float32)) / np.asarray(prep.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def as_pil(item: Any, max_pixels: int = DEFAULT_MAX_PIXELS, source: str = "image") -> Image.Image:
    """A path, PIL image, uint8 array, encoded image bytes or binary file object -> RGB PIL image.

    Bytes and file objects (an upload: io.BytesIO, open(path, "rb")) go through the file loader: their
    size is checked from the header before they are decoded. Anything else gets a clear error.
    """
    if isinstance(item, (str, Path)):
        return load_image(item, max_pixels)
    if isinstance(item, Image.Image):
        if getattr(item, "filename", ""):  # opened from a file: name it in errors
            source = f"{source} ({item.filename!r})"
        if item.width * item.height > max_pixels:
            raise _pixel_limit_error(source, item.width, item.height, max_pixels)
        if min(item.size) < 1:
            raise InputError(f"{source}: expected a non-empty image, got size {item.size}")
        try:
            item.load()  # an image from Image.open decodes only now: a truncated file fails here
        except Exception as exc:  # Pillow raises several unrelated types for broken files
            raise _unreadable(source, exc) from exc
        return to_rgb(item, source)
    if isinstance(item, np.ndarray):
        return array_to_image(item, source, max_pixels)
    if isinstance(item, (bytes, bytearray, memoryview)):
        data = bytes(item)
        return _decode(io.BytesIO(data), f"{source} ({len(data):,} bytes)", max_pixels)
    if hasattr(item, "read"):
        name = getattr(item, "name", None)
        described = f"{source} ({name!r})" if isinstance(name, str) else source
        if isinstance(item, io.TextIOBase):
            raise InputError(f"{described}: expected a binary file object, got a text one; open the file with "
                             "open(path, 'rb')")
        # Back to where it was after reading, so the same object listed twice (or read again) decodes again.
        position = item.tell() if getattr(item, "seekable", lambda: False)() else None
        try:
            return _decode(item, described, max_pixels)
        finally:
            if position is not None:
                item.seek(position)
    raise InputError(
        f"{source}: expected a file path, a PIL image, a numpy array, encoded image bytes or a binary file object "
        f"(e.g. io.BytesIO), got {type(item).__name__}"
    )


def _worth_a_thread(item: Any) -> bool:
    """A file to decode, or an in-memory image large enough that resizing it outweighs the hand-over."""
    if isinstance(item, (str, Path, bytes, bytearray, memoryview)) or hasattr(item, "read"):
        return True
    if isinstance(item, Image.Image):
        return item.width * item.height >= THREADED_MIN_PIXELS
    return isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.ndim >= 2 and (
        item.shape[0] * item.shape[1] >= THREADED_MIN_PIXELS)


def usable_cores() -> int:
    """Cores this process may run on (a container or taskset can allow fewer than the machine has)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def _forget_pools_in_child() -> None:
    # A forked child (a pre-fork web server, multiprocessing) inherits the pools but not their
    # threads, so work handed to them would never run: start afresh.
    global _pools_lock
    _pools.clear()
    _pools_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools_in_child)


def _pool(workers: int) -> ThreadPoolExecutor:
    with _pools_lock:
        if workers not in _pools:
            _pools[workers] = ThreadPoolExecutor(workers, thread_name_prefix="edgeshort-preprocess")
        return _pools[workers]


def map_images(convert: Callable[[int, Any], np.ndarray], items: Sequence[Any], workers: int | None = None) -> list:
    """`convert(i, item)` for every image input, results in order; the first failure raises.

    Pillow releases the GIL while it decodes and resizes, so a batch of photos runs on several
    threads: 12-MP JPEGs to 224x224 take 91 ms each on one thread and 46 ms on two (measured).
    Small in-memory images and preprocessed arrays stay on the calling thread, where they are faster.
    """
    workers = min(len(items), workers or usable_cores())
    streams = [id(item) for item in items if hasattr(item, "read")]
    # One file object listed twice has one read position: two threads reading it would corrupt both reads.
    if workers < 2 or not any(_worth_a_thread(item) for item in items) or len(set(streams)) < len(streams):
        return [convert(i, item) for i, item in enumerate(items)]
    listed: set[int] = set()
    for item in items:
        if isinstance(item, Image.Image):
            if id(item) in listed:
                # A lazily opened image listed twice decodes here, once: two threads must not load one image.
                # A broken one fails again in `convert`, whose error names it.
                try:
                    item.load()
                except Exception:
                    pass
            listed.add(id(item))
    return list(_pool(workers).map(convert, range(len(items)), items))
