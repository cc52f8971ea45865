"""Image sources: scikit-learn's embedded digits and files (parquet shards, ImageFolder trees, WebDataset tars).

Every source yields the same in-memory form, `ImageSet`: uint8 RGB images (N, H, W, 3) at the configured square
size, int64 labels (N,), a unique string id per image (the parquet `image.path`, the ImageFolder file below
data.path, `<shard>/<key>` of a tar, or `digits/<split>/<index>`), and the class names. Parquet shards hold rows
`{image: {bytes, path}, label}` (the layout of ImageNet-1K and ../shared/data/fashion_mnist); ImageFolder trees and
WebDataset tars are read as the same rows (engine/data/sources.py, which lists and reads every source through
engine/data/formats/; this module only imports them inside the functions that load a whole split); `decode_rows`
turns such rows into images and is what the Ray Data read stage maps over them. Every row is either converted (any
PIL mode, any size) or skipped with one of SKIP_REASONS, so a web-scraped shard never stops a run for one bad image
and never loses a row without a trace.
"""

from __future__ import annotations

import hashlib
import heapq
import io
import struct
import warnings
import zlib
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, UnidentifiedImageError

from engine.config import ConfigError, DataConfig
from engine.data.rows import SKIP_REASONS, SkipRecords, add_skip, image_struct, no_skips, parse_label


@dataclass(frozen=True)
class ImageSet:
    images: np.ndarray  # (N, H, W, 3) uint8
    labels: np.ndarray  # (N,) int64
    ids: np.ndarray  # (N,) str
    class_names: tuple[str, ...]
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> rows left out of this set

    def __len__(self) -> int:
        return len(self.labels)


class BadImage(ValueError):
    """An image row that cannot become an image; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


# data.resize="auto" center-crops at this image size and above (ImageNet-like data), squashes below (digits, MNIST).
CENTER_CROP_MIN_SIZE = 128
RESIZE_MODES = ("squash", "center_crop")
# center_crop resizes the whole image and then crops, exactly as torchvision's Resize + CenterCrop, unless the
# resized image would exceed this many times size x size pixels (an extreme aspect ratio: 1 x 100000 would become
# 256 x 25.6M); then only the crop's box of the source is resampled (within a level or two of the same pixels).
MAX_RESIZED_AREA = 16


def resize_mode(config: DataConfig) -> str:
    """data.resize resolved: "squash" or "center_crop" ("auto": center_crop at data.image_size >= 128)."""
    if config.resize == "auto":
        return "center_crop" if config.image_size >= CENTER_CROP_MIN_SIZE else "squash"
    if config.resize not in RESIZE_MODES:  # a DataConfig built in code, not through load_config's checks
        raise ConfigError(f"data.resize={config.resize!r} is not one of ['auto', 'squash', 'center_crop']")
    return config.resize


def check_mode(mode: str) -> None:
    """Before any decoding: a bad mode must not turn every image into a skipped `corrupt` row."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode must be 'squash' or 'center_crop' (data.resize resolved by resize_mode), "
                         f"got {mode!r}")


def center_crop_square(image: Image.Image, size: int) -> Image.Image:
    """The standard ImageNet evaluation transform: the shorter side resized to round(size * 256 / 224) (bilinear,
    the longer side in proportion, truncated as torchvision does), then the centre size x size (offsets rounded
    as torchvision's CenterCrop). 224 -> resize 256, crop 224; 512 -> resize 585, crop 512."""
    short = round(size * 256 / 224)
    width, height = image.size
    if width <= height:
        new_width, new_height = short, max(short, int(short * height / width))
    else:
        new_width, new_height = max(short, int(short * width / height)), short
    left, top = round((new_width - size) / 2), round((new_height - size) / 2)
    if new_width * new_height <= MAX_RESIZED_AREA * size * size:
        return image.resize((new_width, new_height), Image.BILINEAR).crop((left, top, left + size, top + size))
    x_scale, y_scale = width / new_width, height / new_height
    box = (left * x_scale, top * y_scale, (left + size) * x_scale, (top + size) * y_scale)
    return image.resize((size, size), Image.BILINEAR, box=box)


def to_rgb_square(image: Image.Image, size: int, mode: str = "squash") -> np.ndarray:
    """Any PIL image -> (size, size, 3) uint8. mode "squash" resizes the whole image to size x size without
    cropping (exact for the square digits and MNIST-likes; a non-square image is distorted); "center_crop" is the
    standard ImageNet evaluation transform (`center_crop_square`); data.resize chooses (`resize_mode`). Alpha is
    dropped (as torchvision's loaders do); 16/32-bit integer images are scaled from 0..65535, float images clipped
    to 0..255, because PIL's own conversion of those modes saturates instead of scaling."""
    check_mode(mode)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        pixels = np.asarray(image, dtype=np.float64) / 257.0
        image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.rint(np.asarray(image)), 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # PIL warns when a transparent palette goes straight to RGB
    image = image.convert("RGB")
    if mode == "center_crop":
        return np.asarray(center_crop_square(image, size), dtype=np.uint8)
    return np.asarray(image.resize((size, size), Image.BILINEAR), dtype=np.uint8)


def check_pixels(width: int, height: int, max_pixels: int) -> None:
    """A header's size against data.max_image_pixels, before anything is decompressed (a decompression bomb)."""
    if width * height > max_pixels:
        raise BadImage("too_large", f"{width}x{height} pixels > data.max_image_pixels={max_pixels}")


def decode_jpeg_fast(data: bytes, size: int, max_pixels: int, mode: str) -> np.ndarray | None:
    """A whole baseline JPEG in YCbCr or grey (almost every photo) decoded by libjpeg-turbo straight to RGB
    (simplejpeg: 7x faster than PIL at ImageNet-like sizes, where PIL's per-image Python costs more than the
    decode; the same libjpeg settings as PIL's, so the pixels are PIL's exactly, tested), then resized as
    `to_rgb_square` does. None when the bytes are anything else, or are refused: PIL's path decides (and names
    the reason), so a truncated or odd file is judged as before. The size is checked from the header first."""
    if data[:2] != b"\xff\xd8" or data[-2:] != b"\xff\xd9":  # not a JPEG, or one cut short: PIL's path
        return None
    try:
        import simplejpeg
    except ImportError:  # a machine without it: PIL decodes, the pixels are the same
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:  # simplejpeg's error for any libjpeg failure or warning: PIL's path judges the file
        return None
    if colorspace not in ("YCbCr", "Gray"):  # CMYK / YCCK / RGB-coded: PIL's conversions
        return None
    check_pixels(width, height, max_pixels)
    try:
        pixels = simplejpeg.decode_jpeg(data, colorspace="RGB")
    except ValueError:
        return None
    if pixels.shape[:2] == (size, size):
        return np.ascontiguousarray(pixels)
    return to_rgb_square(Image.fromarray(pixels, mode="RGB"), size, mode)


def decode_image_bytes(data: bytes | None, size: int, max_pixels: int = Image.MAX_IMAGE_PIXELS, *,
                       mode: str = "squash") -> np.ndarray:
    """Encoded image bytes -> (size, size, 3) uint8 (resized by `mode`, see `to_rgb_square`), or BadImage saying
    why not. The pixel count is checked from the header, before anything is decompressed, so a decompression bomb
    costs nothing."""
    check_mode(mode)
    if data is None:
        raise BadImage("missing_image", "no image bytes")
    if len(data) == 0:
        raise BadImage("empty", "zero-byte image")
    fast = decode_jpeg_fast(data, size, max_pixels, mode)
    if fast is not None:
        return fast
    try:
        # PIL warns about damaged metadata it reads past (corrupt EXIF, oversized TIFF tags): the row's outcome is
        # what counts, and a web-scraped shard would fill the log with them.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                check_pixels(width, height, max_pixels)
                image.load()
                return to_rgb_square(image, size, mode)
    except BadImage:
        raise
    except Image.DecompressionBombError as error:  # PIL's own limit, when it is below ours
        raise BadImage("too_large", str(error)) from None
    except UnidentifiedImageError as error:
        raise BadImage("corrupt", f"not a readable image ({error.__class__.__name__})") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error) as error:
        reason = "truncated" if "truncated" in str(error).lower() or isinstance(error, EOFError) else "corrupt"
        raise BadImage(reason, f"{error.__class__.__name__}: {error}") from None


def decode_rows(batch: dict, size: int, num_classes: int | None = None,
                max_pixels: int = Image.MAX_IMAGE_PIXELS, *, mode: str = "squash") -> tuple[dict, SkipRecords]:
    """Raw rows (engine/data/rows.py: {image: {bytes, path = id}, label, skip}) -> (decoded, skipped); images resized
    by `mode` ("squash" or "center_crop", see `to_rgb_square`; a caller with a DataConfig passes
    `resize_mode(config)`).

    decoded: {id, label, image (B, size, size, 3) uint8} for the rows that are images with a valid label.
    skipped: skip records (engine.data.rows.SkipRecords) for every other row, so none is lost without a trace: a row
    the reader marked (`skip`), a missing `label` column, a null label, one that is not a decimal integer
    (engine.data.rows.parse_label) or one outside [0, num_classes) (`num_classes=None` skips no label as out of range),
    then the image's own faults. Never raises for a row's content.
    """
    check_mode(mode)
    structs = batch.get("image")
    count = len(structs) if structs is not None else len(batch.get("label", ()))
    structs = structs if structs is not None else [None] * count
    labels, skips = batch.get("label"), batch.get("skip")
    kept, skipped = {"id": [], "label": [], "image": []}, no_skips()
    for row in range(count):
        struct = image_struct(structs[row])
        row_id = str(struct.get("path") or f"<row {row} of its batch, no path>")
        try:
            skip = None if skips is None else skips[row]
            if skip:
                reason, _, detail = str(skip).partition(": ")
                raise BadImage(reason, detail)
            if labels is None:
                raise BadImage("missing_label", "no label column")
            label, skip = parse_label(labels[row])
            if skip:
                reason, _, detail = skip.partition(": ")
                raise BadImage(reason, detail)
            if label is None:
                raise BadImage("missing_label", "null label")
            if label < 0 or (num_classes is not None and label >= num_classes):
                raise BadImage("label_out_of_range", f"label {label} not in [0, {num_classes})")
            image = decode_image_bytes(struct.get("bytes"), size, max_pixels, mode=mode)
        except BadImage as bad:
            add_skip(skipped, row_id, bad.reason, bad.detail)
            continue
        kept["id"].append(row_id)
        kept["label"].append(label)
        kept["image"].append(image)
    decoded = {
        "id": np.array(kept["id"], dtype=object),
        "label": np.asarray(kept["label"], dtype=np.int64),
        "image": np.stack(kept["image"]) if kept["image"] else np.zeros((0, size, size, 3), np.uint8),
    }
    return decoded, skipped


def count_skipped(reasons) -> dict[str, int]:
    """reason per skipped row -> {reason: n}, in SKIP_REASONS order, zero counts omitted."""
    reasons = list(reasons)
    return {r: reasons.count(r) for r in SKIP_REASONS if r in reasons}


def load_digits_split(config: DataConfig, split: str) -> ImageSet:
    """scikit-learn's digits split (engine.data.formats.digits.read_digits) as images of data.image_size."""
    from engine.data.formats.digits import DIGIT_NAMES, read_digits

    pixels, labels, ids = read_digits(config, split)
    mode = resize_mode(config)  # squash at the default 16 px: the 8x8 digits are square
    images = np.stack([to_rgb_square(Image.fromarray(p, mode="L"), config.image_size, mode) for p in pixels])
    return ImageSet(images, labels, ids, DIGIT_NAMES)


class TooManyBadRows(ValueError):
    """More rows skipped than data.max_skip_fraction allows; the message names the first bad rows."""


def check_skipped(rows_read: int, skipped: SkipRecords, max_fraction: float) -> None:
    """Fail, naming the first bad rows by id and reason, when more than `max_fraction` of the rows read were
    skipped; below it the run goes on and the counts are reported."""
    bad = len(skipped["id"])
    if bad == 0 or bad <= max_fraction * rows_read:
        return
    order = sorted(range(bad), key=lambda i: skipped["id"][i])[:5]
    first = "; ".join(f"{skipped['id'][i]} ({skipped['reason'][i]}: {skipped['detail'][i]})" for i in order)
    raise TooManyBadRows(f"{bad} of {rows_read} rows could not be used ({count_skipped(skipped['reason'])}), more than "
                     f"data.max_skip_fraction={max_fraction}; first: {first}")


def load_file_split(config: DataConfig, split: str) -> ImageSet:
    """Read and decode a whole split of a file source (parquet, imagefolder, webdataset; engine/data/sources.py) in this
    process (small sets and evaluation; encoding streams through Ray). Bad rows are left out and counted in
    `skipped`, exactly as the encode stage leaves them out: the listing's skips, then decode_rows' per batch."""
    from engine.data.sources import class_names, iter_row_batches, scan_source

    listing = scan_source(config, split)
    names = class_names(config)
    all_skipped = no_skips()
    for key in all_skipped:
        all_skipped[key] += listing.skipped[key]
    parts = []
    for rows in iter_row_batches(config, split, listing=listing):
        decoded, skipped = decode_rows(rows, config.image_size, len(names), config.max_image_pixels,
                                       mode=resize_mode(config))
        parts.append(decoded)
        for key in all_skipped:
            all_skipped[key] += skipped[key]
    check_skipped(sum(len(p["id"]) for p in parts) + len(all_skipped["id"]), all_skipped, config.max_skip_fraction)
    size = config.image_size
    return ImageSet(
        np.concatenate([p["image"] for p in parts]) if parts else np.zeros((0, size, size, 3), np.uint8),
        np.concatenate([p["label"] for p in parts]) if parts else np.zeros(0, np.int64),
        np.concatenate([p["id"] for p in parts]) if parts else np.zeros(0, object),
        names,
        count_skipped(all_skipped["reason"]),
    )


def sample_key(seed: int, row_id: str) -> int:
    """A row's place in the seeded sample order: a hash of (seed, id), so the sample depends neither on the order
    rows are read in nor on which other rows exist."""
    return int.from_bytes(hashlib.blake2b(f"{seed}\0{row_id}".encode(), digest_size=8).digest(), "big")


def sample_split(config: DataConfig, split: str, limit: int, seed: int, enforce_skip_limit: bool = True) -> ImageSet:
    """A seeded, class-stratified sample of at most `limit` images of a split, in one streamed pass: per class,
    the limit / classes rows of lowest sample_key are kept (encoded bytes only, a bounded heap per class) and
    decoded at the end. Memory is the sample, never the split. More than data.max_skip_fraction of bad rows in the
    sample stops it (TooManyBadRows), as it stops load_split, unless `enforce_skip_limit` is off (a few reference
    images, where one bad row of three says nothing of the split). limit=0 gives the whole split (load_split); the
    embedded digits are always whole (1437 images)."""
    if limit == 0 or config.source == "digits":
        return load_split(config, split)  # asked for the whole split (small sets), or the 1437 digits
    from engine.data.sources import class_names, iter_row_batches

    names = class_names(config)
    quota = max(1, limit // len(names))
    kept: dict[int, list] = {}  # label -> heap of (-key, id, bytes, label): the quota lowest keys seen so far
    for rows in iter_row_batches(config, split):
        for image, label, skip in zip(rows["image"], rows["label"], rows["skip"]):
            image = image or {}
            row_id = str(image.get("path"))
            # Rows without a usable label are sampled too (in a bucket of their own), so the sample's share of bad
            # rows estimates the split's and data.max_skip_fraction is enforced on it, as load_split does.
            bucket = label if skip is None and label is not None and 0 <= label < len(names) else -1
            entry = (-sample_key(seed, row_id), row_id, image.get("bytes"), label, skip)
            heap = kept.setdefault(bucket, [])
            if len(heap) < quota:
                heapq.heappush(heap, entry)
            elif entry > heap[0]:
                heapq.heapreplace(heap, entry)
    chosen = sorted((e for heap in kept.values() for e in heap), key=lambda e: e[1])
    batch = {"image": [{"bytes": e[2], "path": e[1]} for e in chosen], "label": [e[3] for e in chosen],
             "skip": [e[4] for e in chosen]}
    decoded, skipped = decode_rows(batch, config.image_size, len(names), config.max_image_pixels,
                                   mode=resize_mode(config))
    if enforce_skip_limit:
        check_skipped(len(chosen), skipped, config.max_skip_fraction)
    return ImageSet(decoded["image"], decoded["label"], decoded["id"], names, count_skipped(skipped["reason"]))


def load_split(config: DataConfig, split: str) -> ImageSet:
    """A whole split ("train", "val" carved from train, or "test"; engine/data/splits.py) in this process: small
    sets, tests and evaluation only; the stages stream."""
    from engine.data.splits import check_split

    check_split(split)
    if config.source == "digits":
        return load_digits_split(config, split)
    return load_file_split(config, split)


def has_colour(images) -> np.ndarray:
    """(B,) bool: which uint8 images (B, H, W, 3) differ between their channels anywhere (none: a grey source)."""
    images = np.asarray(images)
    return ((images[..., 0] != images[..., 1]) | (images[..., 1] != images[..., 2])).reshape(len(images), -1).any(1)
