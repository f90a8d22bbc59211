"""VaLR's data side: latent blocks before each reasoning step, and external vision-encoder targets for REPA.

VaLR (Vision-aligned Latent Reasoning, https://arxiv.org/abs/2602.04476) puts K = 16 latent tokens before *each*
textual reasoning step, v, q -> (l_1..K, r_1), (l_1..K, r_2), ... -> a, and aligns a middle layer's latent features
to the patch features of frozen external encoders (DINOv3, SigLIP2, pi3) applied to that step's image. Those encoders
are not runtime dependencies here: users compute their features offline, one safetensors file per encoder keyed by
record id, each tensor (n_steps, P, d_enc), and `prepare.py build --external NAME=FILE` validates and stores them.
The stand-in encoder below (a fixed random conv feature map) writes such a file, so tests and the demo run the whole
path with no download.

    python valr.py standin --data data/synthetic/raw/train.jsonl --out data/synthetic/standin.safetensors --layout valr
    python prepare.py build --data F.jsonl --model CKPT --out DIR --layout valr --k 16 --external dinov3=dino.safetensors
    .venv/bin/python -m pytest -q tests/test_valr.py

The REPA loss itself lives in latent_head.py (repa_loss); train.py's --repa-layer / --repa-weight / --repa-encoders
switch it on; README "Reproducing VaLR" has the two training stages.
"""
import json
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

import model
import prepare

# ---- the layout: a K-latent block before each reasoning step ----
# The step-splitting rule, applied to the reasoning part of a response (the text inside <think>...</think>; without
# <think>, the text before <answer>; without either, the whole response):
#   1. if it has "Step n:" markers (any case), each step starts at a marker (text before the first marker, if any,
#      is a step of its own);
#   2. else, if it has blank lines, each paragraph is a step;
#   3. else, if it has line breaks, each non-blank line is a step;
#   4. else the whole reasoning is one step.
# A "<latent>" goes right before the first non-space character of each step. A response that already holds
# "<latent>" is kept as it is: the data marks its own blocks. The answer after the reasoning gets no block.

STEP_MARK = re.compile(r"step\s*\d+\s*:", re.IGNORECASE)


def _reasoning_span(response):
    """(start, end) character offsets of the reasoning part of a response."""
    # an unclosed <think> (a response cut short) runs to the end of the text
    think = re.search(r"<think>(.*?)(</think>|$)", response, re.DOTALL)
    if think:
        return think.start(1), think.end(1)
    answer = response.find("<answer>")
    return 0, answer if answer >= 0 else len(response)


def step_starts(text):
    """Offsets in `text` where reasoning steps begin (the rule above); [] for blank text."""
    first = lambda a: a + len(text[a:]) - len(text[a:].lstrip())   # first non-space character at or after a
    marks = [m.start() for m in STEP_MARK.finditer(text)]
    if marks:
        starts = ([first(0)] if text[:marks[0]].strip() else []) + marks
    elif re.search(r"\n[ \t]*\n", text):
        starts = [first(m.end()) for m in re.finditer(r"(^|\n[ \t]*\n)\s*", text)]
    elif "\n" in text:
        starts = [first(m.start()) for m in re.finditer(r"(?m)^.*\S", text)]
    else:
        starts = [first(0)]
    return sorted({a for a in starts if a < len(text) and text[a:].strip()})


def layout(response):
    """A plain CoT response -> the same text with "<latent>" before each reasoning step (see the rule above)."""
    if prepare.LATENT_PLACEHOLDER in response:
        return response
    a, b = _reasoning_span(response)
    out, last = [], 0
    for s in step_starts(response[a:b]):
        out += [response[last:a + s], prepare.LATENT_PLACEHOLDER]
        last = a + s
    return "".join(out) + response[last:]


# ---- external targets: validate, store in the prepared folder ----
# Stored as bf16 shards external-NAME-00000.safetensors (shard_size records each), like the ViT targets: REPA is a
# cosine loss, and bf16's ~3 significant digits change a cosine by < 1e-2 of its range, while halving the disk
# (DINOv3 ViT-L: 256 patches x 1024 dims x 2 bytes = 0.5 MB per step).

NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def parse_external(spec):
    """"NAME=FILE" -> (name, Path). "gap" is taken: it names the aux-image ViT targets in train.py --repa-encoders."""
    name, sep, path = spec.partition("=")
    if not sep or not NAME.fullmatch(name) or not path:
        raise ValueError(f"--external {spec}: expected NAME=FILE with NAME of letters, digits, _ . -")
    if name == "gap":
        raise ValueError(f"--external {spec}: the name 'gap' is reserved for the aux-image ViT targets")
    if not Path(path).is_file():
        raise ValueError(f"{path}: external '{name}': expected a safetensors file, found no such file")
    return name, Path(path)


def store_external(name, path, blocks, out, shard_size):
    """Check FILE against the records and write its shards. blocks: [(record id, n latent blocks)] of the kept
    records that have blocks. Every id must be present with a (n_blocks, P, d) floating tensor, one (P, d) for the
    whole file, all values finite; extra ids (records skipped or without blocks) are ignored. Raises ValueError with
    a one-line message naming the file, the id and what was expected. -> {"file", "patches": P, "dim": d, "shards"}."""
    where = lambda rid: f"{path} (id {rid}): external '{name}'"
    for old in Path(out).glob(f"external-{name}-*.safetensors"):   # a rebuild with fewer records leaves no stale shard
        old.unlink()
    P_d, shards = None, []
    with _open(name, path) as f:
        keys = set(f.keys())
        for s in range(0, len(blocks), shard_size):
            tensors = {}
            for rid, n in tqdm(blocks[s:s + shard_size], desc=f"external {name}", disable=len(blocks) < 1000):
                if rid not in keys:
                    raise ValueError(f"{where(rid)}: expected a ({n}, P, d) tensor for its {n} latent block(s), "
                                     f"found no such id in the file")
                t = f.get_tensor(rid)
                want = f"({n}, {P_d[0]}, {P_d[1]})" if P_d else f"({n}, P, d)"
                ok = t.dim() == 3 and t.shape[0] == n and min(t.shape) > 0 and t.is_floating_point()
                if not ok or (P_d is not None and tuple(t.shape[1:]) != P_d):
                    raise ValueError(f"{where(rid)}: expected a floating {want} tensor (one per latent block), found "
                                     f"{tuple(t.shape)} {t.dtype}")
                bad = int((~torch.isfinite(t)).sum())
                if bad:
                    raise ValueError(f"{where(rid)}: expected finite values, found {bad} NaN/inf of {t.numel()}")
                # the first tensor fixes (P, d) for the whole file: the projector has one output shape
                P_d = P_d or tuple(t.shape[1:])
                # bf16, like the latent targets' shards: half the bytes of fp32
                tensors[rid] = t.to(torch.bfloat16).contiguous()
            shard = f"external-{name}-{s // shard_size:05d}.safetensors"
            prepare.write_shard(tensors, Path(out) / shard, "")
            shards.append(shard)
    if P_d is None:
        raise ValueError(f"{path}: external '{name}': expected features for the records' latent blocks, but no kept "
                         f"record has a block")
    return {"file": str(Path(path).resolve()), "patches": P_d[0], "dim": P_d[1], "shards": shards}


def _open(name, path):
    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:   # safetensors raises its own error types for truncated or foreign files
        raise ValueError(f"{path}: external '{name}': expected a safetensors file, found an unreadable one ({e})")


# ---- the stand-in encoder ----


class StandinEncoder:
    """A fixed random conv feature map in place of DINOv3 / SigLIP2: the image squashed to a (g s)^2 square, one
    s x s stride-s conv (weights N(0, 1/fan_in) from the seed), centred over the image's patches, then tanh ->
    (P = g^2, dim) patch features in raster order. Deterministic, CPU, no download. The centring matters: without it
    every patch shares one large common direction and a projector reaches cos ~0.95 by predicting that constant;
    centred, a patch's feature says how it differs from the rest of its image, as a real encoder's patches do."""

    def __init__(self, patches=16, dim=32, patch_px=8, seed=0):
        g = math.isqrt(patches)
        if g * g != patches or dim < 1 or patch_px < 1:
            raise ValueError(f"stand-in encoder: patches must be a perfect square and dim, patch_px >= 1, found "
                             f"patches={patches}, dim={dim}, patch_px={patch_px}")
        gen = torch.Generator().manual_seed(seed)
        self.side, self.patch_px = g * patch_px, patch_px
        self.weight = torch.randn(dim, 3, patch_px, patch_px, generator=gen) / math.sqrt(3 * patch_px ** 2)

    @torch.no_grad()
    def __call__(self, image):
        img = model.load_image(image) if not isinstance(image, Image.Image) else image
        img = img.convert("RGB").resize((self.side, self.side), resample=Image.BICUBIC)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]   # (1, 3, H, W)
        # pixels mapped to [-1, 1]: inputs around 0, so the random filters' outputs are not all shifted one way
        y = F.conv2d(x * 2 - 1, self.weight, stride=self.patch_px).flatten(2)[0].T              # (P, dim)
        return torch.tanh(y - y.mean(0)).contiguous()   # centred values have std 0.08-0.5: tanh is near linear


def step_images(rec, base):
    """The image of each latent block of a record: its aux image per block when it has one per block, else the
    question image for every block (the only image a plain CoT record has)."""
    n = rec["response"].count(prepare.LATENT_PLACEHOLDER)
    aux = rec.get("aux_images") or []
    paths = aux if len(aux) == n else [rec["image"]] * n
    return [base / p for p in paths]


@dataclass
class StandinOptions:
    data: str = field(metadata={"help": "input JSONL (the one prepare.py build reads)"})
    out: str = field(metadata={"help": "output safetensors: {record id: (n_steps, P, dim) float32}"})
    layout: str = field(default="gap", metadata={"help": "gap | valr: the layout prepare.py build will use (how "
                                                         "many blocks a record has)", "choices": ("gap", "valr")})
    patches: int = field(default=16, metadata={"min": 1, "help": "P patches per image, a perfect square"})
    dim: int = field(default=32, metadata={"min": 1, "help": "feature dim d_enc"})
    seed: int = field(default=0, metadata={"help": "the conv weights (another seed = another encoder)"})


def standin(opts):
    prepare.check_options(opts)
    try:
        enc = StandinEncoder(opts.patches, opts.dim, seed=opts.seed)
    except ValueError as e:
        raise prepare.DataError(str(e)) from None
    path, feats = Path(opts.data), {}
    for lineno, line in enumerate(tqdm(path.read_text(encoding="utf-8").splitlines(), desc="stand-in encoder"), 1):
        if not line.strip():
            continue
        try:   # the records were or will be validated by prepare.py build; here only what the encoder needs
            rec = json.loads(line)
            if opts.layout == "valr":
                rec["response"] = layout(rec["response"])
            images = step_images(rec, path.parent)
            if images:
                feats[rec["id"]] = torch.stack([enc(p) for p in images])      # (n_steps, P, dim)
        except (ValueError, KeyError, TypeError, AttributeError) as e:   # JSONDecodeError is a ValueError
            raise prepare.DataError(f"{path} line {lineno}: cannot encode the record's step images: "
                                    f"{type(e).__name__}: {e}") from None
    save_file(feats, opts.out, metadata={"format": "gap-external", "encoder": f"standin-seed{opts.seed}"})
    print(f"standin: {len(feats)} records, features ({opts.patches}, {opts.dim}) per step -> {opts.out}")


def main(argv=None):
    parser = prepare.Parser(description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sp = sub.add_parser("standin", help="write stand-in encoder features for a JSONL dataset",
                        description="write stand-in encoder features for a JSONL dataset")
    prepare.add_options(sp, StandinOptions)
    args = parser.parse_args(argv)
    return standin(StandinOptions(**{f.name: getattr(args, f.name) for f in fields(StandinOptions)}))


if __name__ == "__main__":
    prepare.run_main(main)
