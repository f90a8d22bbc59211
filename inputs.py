"""
The inputs gap reads, checked at the door: the DataError every script reports as one line, JSON and safetensors
readers that name the file, and Qwen2.5-VL's image preprocessing, bit-exact with transformers' processor:
    https://github.com/huggingface/transformers/blob/main/src/transformers/models/qwen2_vl/image_processing_qwen2_vl.py
model.py re-exports every name (model.preprocess_image, model.DataError, ...), so callers import model only.

    .venv/bin/python -m pytest -q tests/test_model.py -k image    # against Qwen2VLImageProcessorPil
"""
import contextlib
import json
import math
import os
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError, safe_open

# ---------------------------------------------------------------------------------------------------------------
# ---- errors: what a bad input file raises ----


class DataError(ValueError):
    """An expected failure caused by an input (a file, a record, an option), not by a bug in gap. The message says
    where and what: "<file>[ line N][ (id X)]: <field>: <what was expected, what was found>". Every script prints it
    as one line on stderr and exits 1 (prepare.run_main); anything else is a bug and keeps its traceback."""


def data_error(file, field, reason, line=None, rid=None):
    """-> a DataError with the message laid out as above (line and id when the input has them)."""
    at = (f" line {line}" if line is not None else "") + (f" (id {rid})" if rid is not None else "")
    return DataError(f"{file}{at}: {field}: {reason}")


def read_json(path):
    """json.loads of a file, naming the file when it is missing, cut short or not JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise data_error(path, "file", f"expected a JSON file, found {type(e).__name__}: {e}") from None


def write_text_atomic(path, text):
    """Write to a temporary name, then rename: a crash never leaves a half-written file under the real name."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def jsonl_lines(path):
    """-> (line number, text) of every non-blank line of a JSONL file. Lines end at "\\n" only: str.splitlines()
    also ends them at U+2028, U+0085, \\x0c ..., which are valid raw inside a JSON string, and would cut one record
    in two and shift every later line number. A line that is not UTF-8 is an error naming the file and the line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:   # a UTF-8 byte-order mark may start the file (some Windows editors write one)
                text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise data_error(path, "text", f"expected UTF-8, found byte 0x{raw[e.start]:02x} at column "
                                               f"{e.start + 1}", line=lineno) from None
            if text.strip():
                yield lineno, text


@contextlib.contextmanager
def open_safetensors(path, device="cpu"):
    """safe_open that names the file when it is truncated or not safetensors at all (safetensors' own error says
    only "Error while deserializing header")."""
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            yield f
    except SafetensorError as e:
        raise data_error(path, "file", f"expected a safetensors file, found an unreadable one ({e})") from None


# ---------------------------------------------------------------------------------------------------------------
# ---- image preprocessing, bit-exact with transformers' Qwen2VLImageProcessorPil ----

IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)   # OpenAI CLIP
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_DECODE_PIXELS = 89_478_485   # refuse to decode larger files (PIL's own decompression-bomb limit)
# transformers' Qwen2VLImageProcessor class defaults (4 to 1280 image tokens), used for a folder without a
# preprocessor_config.json. The hub's Qwen2.5-VL folders set 3136 / 12845056 there (up to 16384 image tokens).
DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS = 56 * 56, 28 * 28 * 1280


def read_pixel_limits(folder):
    """(min_pixels, max_pixels) from a model folder's preprocessor_config.json, or None without one. Both
    spellings are read: `min_pixels`/`max_pixels` (hub) and `size: {shortest_edge, longest_edge}` (transformers
    >= 4.5x); like transformers, min_pixels/max_pixels win where both are present."""
    path = Path(folder) / "preprocessor_config.json"
    if not path.is_file():
        return None
    d = read_json(path)
    size = d.get("size") if isinstance(d.get("size"), dict) else {}
    out = []
    for key, alt, default in (("min_pixels", "shortest_edge", DEFAULT_MIN_PIXELS),
                              ("max_pixels", "longest_edge", DEFAULT_MAX_PIXELS)):
        v = d.get(key) if d.get(key) is not None else size.get(alt, default)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise DataError(f"{path}: {key}: expected a positive integer, found {v!r}")
        out.append(v)
    if out[0] > out[1]:
        raise DataError(f"{path}: min_pixels {out[0]} > max_pixels {out[1]}")
    return tuple(out)


def smart_resize(height, width, factor=28, min_pixels=DEFAULT_MIN_PIXELS, max_pixels=DEFAULT_MAX_PIXELS):
    """smart_resize: multiples of `factor`, pixel count within [min_pixels, max_pixels], aspect ratio kept."""
    if min(height, width) <= 0:
        raise DataError(f"image has zero size ({height}x{width})")
    # transformers' smart_resize refuses the same: past 200:1 the short side cannot keep its shape on a 28 px grid
    if max(height, width) / min(height, width) > 200:
        raise DataError(f"image aspect ratio {max(height, width) / min(height, width):.1f} is over 200 "
                         f"({height}x{width})")
    h, w = round(height / factor) * factor, round(width / factor) * factor   # Python round: banker's on .5
    if h * w > max_pixels:
        # too many pixels: shrink both sides by beta (area / beta^2 = max_pixels) and floor, so the result stays under
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        # too few: grow both sides by beta and ceil, so the result reaches min_pixels
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def load_image(path):
    """Open an image file safely: a pixel cap before decoding, a clear ValueError for anything unusable."""
    try:
        img = Image.open(path)
        if img.width * img.height > MAX_DECODE_PIXELS:
            raise DataError(f"{path}: {img.width}x{img.height} is over the {MAX_DECODE_PIXELS} pixel cap")
        # Image.open read only the header, so the size check above decoded nothing; the decode happens here
        img.load()
        return img
    except DataError:
        raise
    except Exception as e:   # PIL raises many types for broken files (UnidentifiedImageError, OSError, SyntaxError)
        raise DataError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None


def preprocess_image(image, min_pixels=DEFAULT_MIN_PIXELS, max_pixels=DEFAULT_MAX_PIXELS, patch_size=14, merge_size=2,
                     temporal_patch_size=2):
    """PIL image (or a path) -> pixel_values (N, 3*2*14*14) float32 and image_grid_thw (1, 3) int64."""
    if not isinstance(image, Image.Image):
        image = load_image(image)
    W, H = image.size
    # a PIL image handed in directly has not been through load_image's check
    if W * H > MAX_DECODE_PIXELS:
        raise DataError(f"image {W}x{H} is over the {MAX_DECODE_PIXELS} pixel cap")
    h, w = smart_resize(H, W, patch_size * merge_size, min_pixels, max_pixels)
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        # transparency is composited onto white, like transformers' convert_to_rgb
        image = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image)
    image = image.convert("RGB").resize((w, h), resample=Image.BICUBIC)
    x = np.asarray(image).transpose(2, 0, 1)                                  # (3, h, w) uint8
    x = (x.astype(np.float64) * (1 / 255)).astype(np.float32)                 # rescale in f64, like transformers
    mean, std = np.array(IMAGE_MEAN, np.float32), np.array(IMAGE_STD, np.float32)
    # (3, h, w).T is (w, h, 3): the channel axis last, where the (3,) mean and std broadcast
    x = ((x.T - mean) / std).T                                                # per channel, float32
    gh, gw, m, P = h // patch_size, w // patch_size, merge_size, patch_size
    x = x.reshape(3, gh // m, m, P, gw // m, m, P).transpose(1, 4, 2, 5, 0, 3, 6)   # (gh/m, gw/m, m, m, C, P, P)
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], temporal_patch_size, P, P))  # frame duplicated T=2
    pixel_values = torch.from_numpy(np.ascontiguousarray(x).reshape(gh * gw, 3 * temporal_patch_size * P * P))
    return pixel_values, torch.tensor([[1, gh, gw]], dtype=torch.long)


class PixelBudget:
    """Bounds the pixels decoded at once by all worker threads, so build memory follows the images, not the worker
    count: four 9000x9000 PNGs decoded together held 3.9 GB (~12 bytes a pixel: the decode, RGBA, the composite onto
    white, RGB). An image larger than the whole budget waits until it can run alone."""

    def __init__(self, limit):
        self.limit, self.used, self.cond = limit, 0, threading.Condition()
        # Pillow allocates images in 16 MB blocks, which glibc serves from per-thread arenas and keeps after they
        # are freed: 4 workers decoding one 81 MP PNG at a time still peaked at 2.4 GB. 64 MB blocks are above
        # glibc's largest mmap threshold (32 MB), so each is returned to the OS when its image is freed (0.9 GB).
        # Same as PILLOW_BLOCK_SIZE=64m: https://pillow.readthedocs.io/en/stable/reference/block_allocator.html
        Image.core.set_block_size(max(Image.core.get_block_size(), 64 << 20))

    @contextmanager
    def hold(self, path):
        try:   # the header only: PIL decodes lazily
            with Image.open(path) as img:
                # capped at the budget: an image larger than all of it still runs, alone
                n = min(img.width * img.height, self.limit)
        except Exception:   # unreadable: load_image says why, and decodes nothing
            n = 0
        with self.cond:
            self.cond.wait_for(lambda: self.used + n <= self.limit)
            self.used += n
        try:
            yield
        finally:
            with self.cond:
                self.used -= n
                self.cond.notify_all()
