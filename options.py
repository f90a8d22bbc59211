"""
What every gap script shares: options are dataclasses and argparse is generated from their fields (bounds in the
metadata, checked at parse time and again for library callers), an expected failure ends in one line on stderr
(run_main), and --device / --dtype / the image pixel limits are resolved the same way everywhere.

    python train.py --lr -1          # error: train.py: --lr: expected a number >= 0, found -1.0   (exit 2)
    .venv/bin/python -m pytest -q tests/test_errors.py
"""
import argparse
import math
import os
import sys
from dataclasses import MISSING, field, fields
from pathlib import Path

import torch
from tqdm import tqdm

import model
from model import DataError

# ---- options and errors: what every gap script shares ----
# Options are dataclasses; argparse is generated from their fields, and a field's metadata may bound its value
# (min / max inclusive, above exclusive), checked when the command line is parsed and again by check_options for
# library callers. An expected failure is a DataError (model.py) or an OSError (missing or unwritable file): run_main
# ends it with one line on stderr; every other exception is a bug and keeps its traceback.


def option_problem(f, v):
    """-> what is wrong with value v of the int/float option field f ("expected ..., found ..."), or None."""
    m, kind = f.metadata, "an integer" if f.type is int else "a number"
    # nan compares False with every bound and would pass them all: refuse it (and inf) before the bounds
    if isinstance(v, float) and not math.isfinite(v):
        return f"expected a finite number, found {v}"
    if ("min" in m and v < m["min"]) or ("max" in m and v > m["max"]) or ("above" in m and v <= m["above"]):
        want = [f"> {m['above']}"] if "above" in m else [f">= {m['min']}"] if "min" in m else []
        want += [f"<= {m['max']}"] if "max" in m else []
        return f"expected {kind} {' and '.join(want)}, found {v}"
    return None


def _option_type(f):
    def parse(s):
        try:
            # int("1.5") and float("x") raise ValueError; argparse turns ArgumentTypeError into Parser.error's one line
            v = f.type(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if f.type is int else 'a number'}, "
                                             f"found {s!r}") from None
        problem = option_problem(f, v)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return v
    return parse


def add_options(parser, cls):
    for f in fields(cls):
        flag, help_ = "--" + f.name.replace("_", "-"), f.metadata.get("help", "")
        type_ = _option_type(f) if f.type in (int, float) else f.type
        # BooleanOptionalAction: --hf and --no-hf both exist, so a True default can be turned off
        if f.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_)
        elif f.type is list:   # repeatable; default None, not [], which argparse's append would share across calls
            parser.add_argument(flag, action="append", default=None, help=help_ + " (repeatable)")
        elif f.default is MISSING:
            parser.add_argument(flag, type=type_, required=True, help=help_)
        else:
            parser.add_argument(flag, type=type_, default=f.default, help=f"{help_} (default {f.default})",
                                choices=f.metadata.get("choices"))


def check_options(opts):
    """The parse-time bounds, for options built in code (train.main(TrainConfig(...)) skips argparse)."""
    for f in fields(opts):
        problem = option_problem(f, getattr(opts, f.name)) if f.type in (int, float) else None
        if problem:
            raise DataError(f"--{f.name.replace('_', '-')}: {problem}")


class _Ignored(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        pass


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad option in one line, "error: <prog>: --flag: <expected, found>" (exit 2), instead
    of the usage block; --help also lists --debug, which run_main handles."""

    def __init__(self, *a, **k):
        k.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*a, **k)
        # listed for --help only: run_main takes --debug out of argv; the action stores nothing, so even an
        # abbreviation (--deb) never reaches the options dataclass
        self.add_argument("--debug", nargs=0, action=_Ignored, default=argparse.SUPPRESS,
                          help="print the traceback of an expected error too")

    def error(self, message):
        self.exit(2, f"error: {self.prog}: {message.removeprefix('argument ')}\n")


# Exit codes: 2 for a bad option (argparse's convention, from Parser.error), 1 for any other expected failure;
# a bug keeps its traceback and Python's own exit code 1.


def run_main(main, argv=None):
    """Every script's door: main(argv); a DataError or OSError ends in one line on stderr and exit code 1, Ctrl-C in
    "interrupted" and exit code 130."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    try:
        return main([a for a in argv if a != "--debug"])
    except (DataError, OSError) as e:
        if debug:
            raise
        close_progress_bars()
        # an OSError from open() carries filename and strerror ("x.jsonl: No such file or directory"); one raised with
        # just a message prints as that message
        where = isinstance(e, OSError) and e.filename is not None and e.strerror
        print(f"error: {f'{e.filename}: {e.strerror}' if where else e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:   # Ctrl-C: one line and the shell's 128 + SIGINT, not a traceback from deep in torch
        if debug:
            raise
        close_progress_bars()
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def close_progress_bars():
    """End every open tqdm bar's line, so that the one-line message starts a line of its own."""
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


# ---- device, precision and image pixel limits, resolved once per script ----


def device_option():
    """--device, as every script takes it (resolve_device)."""
    return field(default="auto", metadata={"help": "auto (a GPU if there is one; under torchrun cuda:LOCAL_RANK) | "
                                                   "cpu | cuda | cuda:N"})


def dtype_option():
    """--dtype, as every script that loads a model takes it (resolve_dtype)."""
    return field(default="auto", metadata={"help": "auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32"})


def resolve_device(name):
    """auto = CUDA when there is one, else cpu. A bare "cuda" (and auto) is cuda:LOCAL_RANK, so every rank of a
    torchrun gets its own GPU; a CUDA device is made the current one, since CUDA graphs, compiled kernels and NCCL
    run on the current device whatever tensor they are handed."""
    try:
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    except RuntimeError:
        raise DataError(f"--device: expected auto, cpu, cuda or cuda:N, found {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DataError(f"--device: expected a device this machine has, found {name!r} (torch sees no CUDA GPU)")
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    return device


def resolve_dtype(name, device):
    # auto: bf16 on CUDA (the checkpoints' own dtype, half the memory), fp32 on CPU (bf16 matmuls are slow or
    # emulated on most CPUs)
    table = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in table:
        raise DataError(f"--dtype: expected auto, bf16, fp16 or fp32, found {name!r}")
    return table[name]


def resolve_pixels(model_dir, min_pixels=-1, max_pixels=-1):
    """The smart_resize limits for a model folder -> (min_pixels, max_pixels, where they came from). In order:
    the command line (values > 0), gap.json (the resolution train.py trained at), preprocessor_config.json (the
    hub's: 3136 / 12845056), transformers' class defaults (3136 / 1003520). The same image gives a different
    number of image tokens under each (1600x1200: 2451 tokens at the hub's limits, 1230 at the defaults)."""
    folder, lo, hi, where = Path(model_dir), model.DEFAULT_MIN_PIXELS, model.DEFAULT_MAX_PIXELS, "defaults"
    gap = folder / "gap.json"
    trained = model.read_json(gap) if gap.is_file() else {}
    if trained.get("image_min_pixels") and trained.get("image_max_pixels"):
        lo, hi, where = trained["image_min_pixels"], trained["image_max_pixels"], str(gap)
    elif (found := model.read_pixel_limits(folder)) is not None:
        (lo, hi), where = found, str(folder / "preprocessor_config.json")
    # either flag alone overrides only its own limit; the other keeps the value found above
    if min_pixels > 0 or max_pixels > 0:
        lo, hi = (min_pixels if min_pixels > 0 else lo), (max_pixels if max_pixels > 0 else hi)
        where = "command line" if min_pixels > 0 and max_pixels > 0 else f"command line and {where}"
    if not 0 < lo <= hi:
        raise DataError(f"pixel limits: expected 0 < min_pixels <= max_pixels, found {lo} and {hi} ({where})")
    return lo, hi, where


def print_pixels(limits):
    lo, hi, where = limits
    # 784 = 28 x 28 px per image token (14 px patches merged 2 x 2)
    print(f"image pixels: min_pixels {lo} max_pixels {hi} ({where}): {lo // 784}..{hi // 784} image tokens",
          file=sys.stderr)
