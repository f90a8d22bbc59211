"""Data preparation for GAP: tokenizer and chat template, dataset validation, latent targets, PCA, synthetic data.

The tokenizer and chat template are in tokenizer.py, the script plumbing (options, one-line errors) in
options.py; both are re-exported here, so train.py, sample.py and eval.py call prepare.X. The CLI:

    python prepare.py synthetic --out data/synthetic    # toy tasks + tiny random checkpoint + build, < 1 min on CPU
    python prepare.py synthetic --task base|tiles --out DIR --latents 4   # the tile miniature (synthetic.py, make base)
    python prepare.py build --data F.jsonl --model CKPT --out DIR [--latents 36] [--pca-variance 0.95] [--skip-bad]
    python prepare.py build --data F.jsonl --model Qwen2.5-VL-7B-Instruct --out DIR --device cuda --batch-size 256
    torchrun --standalone --nproc_per_node=8 prepare.py score --data F.jsonl --model Qwen2.5-VL-7B-Instruct --samples 8
    python prepare.py convert --from monet|bbox --data F.json --images DIR --out F.jsonl   # public data (convert.py)
    .venv/bin/python -m pytest -q tests/test_prepare.py

`build` validates every record (a bad one stops the build, or with --skip-bad is listed in the manifest: nothing is
dropped silently), tokenizes it with its latent spans, runs each auxiliary image through the frozen ViT to get the N
latent targets (bf16 safetensors shards, resumable), and fits the PCA basis of Eq. 1 over all target rows. Stripping
spans of easy records (accuracy > tau) is train.py's job. VaLR's layout and external encoder targets:
    python prepare.py build --data F.jsonl --model CKPT --out DIR --layout valr --k 16 --external dinov3=dino.safetensors
"""
import argparse
import hashlib
import json
import math
import os
import random
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from tqdm import tqdm

import latent_head
import model
from model import DataError, data_error
# moved to their own files; re-exported, so prepare.X keeps working
from inputs import PixelBudget, jsonl_lines  # noqa: F401
from options import (Parser, add_options, check_options, device_option, dtype_option, option_problem,  # noqa: F401
                     print_pixels, resolve_device, resolve_dtype, resolve_pixels, run_main)
from tokenizer import (CHAT_TEMPLATE, IGNORE, LATENT_PLACEHOLDER, LATENT_TOKENS, QWEN_SPECIAL_TOKENS,  # noqa: F401
                       SYSTEM_PROMPT, build_example, check_latent_ids, load_tokenizer, prompt_ids,
                       serialize_response, token_ids, write_hub_files)

# ---- options (argparse is generated from these dataclasses; bounds in the metadata) ----

DECODE_PIXELS = model.MAX_DECODE_PIXELS   # default decode budget of a build: one largest image at a time (~1 GB)


@dataclass
class BuildOptions:
    data: str = field(metadata={"help": "input JSONL, one record per line, paths relative to the file"})
    model: str = field(metadata={"help": "checkpoint folder (config.json, *.safetensors, tokenizer.json)"})
    out: str = field(metadata={"help": "output folder (records.jsonl, targets-*.safetensors, pca, manifest)"})
    latents: int = field(default=36, metadata={"min": 1, "help": "N latents per span, a perfect square (6x6 = 36)"})
    pca_variance: float = field(default=0.95,
                                metadata={"above": 0, "max": 1, "help": "explained variance that picks k (Eq. 7)"})
    skip_bad: bool = field(default=False, metadata={"help": "skip bad records (listed in manifest and stderr)"})
    batch_size: int = field(default=32, metadata={"min": 1, "help": "auxiliary images per ViT call"})
    shard_size: int = field(default=1024, metadata={"min": 1, "help": "records per targets shard (the unit of resume)"})
    device: str = device_option()
    dtype: str = dtype_option()
    workers: int = field(default=4, metadata={"min": 1, "help": "threads decoding images"})
    decode_pixels: int = field(default=DECODE_PIXELS, metadata={
        "min": 1, "help": "pixels decoded at once over all workers (bounds memory: ~12 bytes each)"})
    max_length: int = field(default=0, metadata={
        "min": 0, "help": "longest example in tokens (prompt, image tokens, response); 0 = max_position_embeddings"})
    min_pixels: int = field(default=-1, metadata={"help": "question image: smart_resize min_pixels; -1 = the "
                                                          "model folder's preprocessor_config.json"})
    max_pixels: int = field(default=-1, metadata={"help": "question image: smart_resize max_pixels; -1 = the "
                                                          "model folder's preprocessor_config.json"})
    layout: str = field(default="gap", metadata={"help": "gap: a <latent> span per aux image (N latents, ViT targets, "
                                                         "PCA) | valr: a K-latent block before each reasoning step "
                                                         "(valr.py), no ViT targets | text: plain-text data with no "
                                                         "span (a base-model stage), no targets, no PCA",
                                                 "choices": ("gap", "valr", "text")})
    k: int = field(default=16, metadata={"min": 1, "help": "--layout valr: K latents per block (VaLR: 16)"})
    external: list = field(default_factory=list, metadata={
        "help": "NAME=FILE: external encoder features {record id: (n_blocks, P, d)} for REPA (valr.py)"})


@dataclass
class SyntheticOptions:
    out: str = field(metadata={"help": "output folder: raw/, model/, prepared/"})
    n: int = field(default=600, metadata={"min": 2, "help": "examples in total (train + test)"})
    seed: int = field(default=12345, metadata={"help": "everything (images, split, weights) follows from it"})
    test_frac: float = field(default=0.2,
                             metadata={"min": 0, "max": 1, "help": "fraction of examples in raw/test.jsonl"})
    latents: int = field(default=36, metadata={"min": 1, "help": "N latents per span for the build step"})
    device: str = device_option()
    task: str = field(default="classic", metadata={
        "help": "classic: three toy families + a random tiny model + build | base: the tile miniature's single-hop "
                "data + a random base model + build | tiles: its two-hop demo data (raw/ only: score and build it "
                "with the trained base)", "choices": ("classic", "base", "tiles")})


@dataclass
class ScoreOptions:
    data: str = field(metadata={"help": "input JSONL (id, image, question, answer)"})
    model: str = field(metadata={"help": "the base model's checkpoint folder"})
    out: str = field(default=None, metadata={"help": "scored copy (default: DATA.scored.jsonl); resumable"})
    samples: int = field(default=8, metadata={"min": 1, "help": "samples per record"})
    temperature: float = field(default=1.0, metadata={"min": 0, "help": "sampling temperature"})
    max_new_tokens: int = field(default=256, metadata={"min": 1, "help": "token limit per sample"})
    seed: int = field(default=0, metadata={"help": "sampling seed (per record: seed + line)"})
    device: str = device_option()
    min_pixels: int = field(default=-1, metadata={"help": "smart_resize min_pixels; -1 = the model folder's"})
    max_pixels: int = field(default=-1, metadata={"help": "smart_resize max_pixels; -1 = the model folder's"})
    workers: int = field(default=4, metadata={"min": 0, "help": "threads decoding and preprocessing the next records' images"})


# ---- record validation ----


class BadRecord(Exception):
    def __init__(self, field_, reason):
        super().__init__(reason)
        self.field, self.reason = field_, reason


def _describe(v):
    s = json.dumps(v)
    return f"{s[:40] + '...' if len(s) > 40 else s} ({type(v).__name__})"


def _check_fields(obj, base, layout=None):
    """Cheap checks of one parsed line -> normalized record; raises BadRecord(field, reason). layout: a function
    that rewrites the response (valr.layout) before its <latent> count is checked against aux_images."""
    if not isinstance(obj, dict):
        raise BadRecord("record", f"expected a JSON object, found {_describe(obj)}")
    for k in ("id", "image", "question", "response", "answer"):
        if k not in obj:
            raise BadRecord(k, "missing")
        if not isinstance(obj[k], str) or (k in ("id", "image") and not obj[k]):
            raise BadRecord(k, f"expected a non-empty string, found {_describe(obj[k])}" if k in ("id", "image")
                            else f"expected a string, found {_describe(obj[k])}")
    aux = obj.get("aux_images", MISSING)
    if aux is MISSING:
        raise BadRecord("aux_images", "missing (use [] for a record without <latent>)")
    if not isinstance(aux, list) or not all(isinstance(a, str) and a for a in aux):
        raise BadRecord("aux_images", f"expected a list of paths, found {_describe(aux)}")
    acc = obj.get("accuracy")   # missing or null = never scored: train.py keeps its latent spans
    if acc is not None and (isinstance(acc, bool) or not isinstance(acc, (int, float))
                            or not 0.0 <= acc <= 1.0):
        raise BadRecord("accuracy", f"expected a number in [0, 1] or null, found {_describe(acc)}")
    for k in ("question", "response"):
        # a literal special token in the text would be tokenized as that token and break the template
        hit = [t for t in QWEN_SPECIAL_TOKENS + LATENT_TOKENS if t in obj[k]]
        if hit:
            raise BadRecord(k, f"contains the reserved token {hit[0]!r}")
    problem = tag_problem(obj["response"])
    if problem:
        raise BadRecord("response", problem)
    response = layout(obj["response"]) if layout else obj["response"]
    n = response.count(LATENT_PLACEHOLDER)
    if n != len(aux) and not (layout and not aux):   # VaLR blocks need no aux image (then each step's is optional)
        raise BadRecord("aux_images", f"expected {n} entries for {n} {LATENT_PLACEHOLDER}, found {len(aux)}")
    resolve = lambda p: str((base / p).resolve())   # absolute paths pass through `/` unchanged
    return {"id": obj["id"], "image": resolve(obj["image"]), "question": obj["question"],
            "response": response, "aux_images": [resolve(a) for a in aux], "answer": obj["answer"],
            "accuracy": None if acc is None else float(acc)}


# Tags of a response: <think> ... </think><answer> ... </answer>, with <parser> ... </parser> inside <think> (what
# follows a latent span: the text it should let the model read off). Checked with a stack, so a nested, crossed or
# unclosed tag is caught where it happens; tag_problem gives the first one.
_TAG = re.compile(r"</?(think|parser|answer)>")


def tag_problem(response):
    """-> what is wrong with the tag structure of a response ("expected ..., found ... at character i"), or None."""
    stack, answers = [], 0
    for m in _TAG.finditer(response):
        tag, at = m.group(1), f"{m.group(0)} at character {m.start()}"
        parent = stack[-1] if stack else None
        if m.group(0).startswith("</"):
            if parent != tag:
                return f"expected {f'</{parent}>' if parent else f'<{tag}> before it'}, found {at}"
            stack.pop()
        elif tag == "parser" and parent != "think":
            return f"expected <parser> inside <think>, found {at}" + (f" inside <{parent}>" if parent else "")
        elif tag != "parser" and parent is not None:
            return f"expected <{tag}> outside other tags, found {at} inside <{parent}>"
        elif tag == "answer" and answers:
            return f"expected one <answer>, found a second {at}"
        else:
            answers += tag == "answer"
            stack.append(tag)
    return f"expected </{stack[-1]}>, found the end of the response" if stack else None


def _square_rgb(path, side):
    """Auxiliary image -> RGB side x side (bicubic; alpha onto white like the processor). Squashing rather than
    cropping keeps all the evidence; the paper's aux images are crops and sketches, roughly square anyway."""
    img = model.load_image(path)
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        img = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img)
    return img.convert("RGB").resize((side, side), resample=Image.BICUBIC)


def aux_pixels(path, n_latents, vision):
    """-> pixel_values, grid of a (28 sqrt N)^2 square: the ViT + 2x2 merger then gives exactly N embeddings."""
    g, factor = math.isqrt(n_latents), vision.patch_size * vision.spatial_merge_size
    side = factor * g   # 168 px for N = 36
    pv, grid = model.preprocess_image(_square_rgb(path, side), min_pixels=side * side, max_pixels=side * side,
                                      patch_size=vision.patch_size, merge_size=vision.spatial_merge_size,
                                      temporal_patch_size=vision.temporal_patch_size)
    m = vision.spatial_merge_size
    assert grid.tolist() == [[1, g * m, g * m]], f"{path}: grid {grid.tolist()} for a {side}px square"
    return pv, grid


def _check_images(rec, opts, vision, budget):
    """Decode the question image (-> number of <|image_pad|>) and every aux image; raises BadRecord."""
    if not os.path.isfile(rec["image"]):
        raise BadRecord("image", f"file not found: {rec['image']}")
    try:
        with budget.hold(rec["image"]):
            _, grid = model.preprocess_image(rec["image"], opts.min_pixels, opts.max_pixels, vision.patch_size,
                                             vision.spatial_merge_size, vision.temporal_patch_size)
    except ValueError as e:
        raise BadRecord("image", f"cannot use the image: {e}") from None
    for j, a in enumerate(rec["aux_images"]):
        if not os.path.isfile(a):
            raise BadRecord("aux_images", f"entry {j}: file not found: {a}")
        try:   # decoding is what can fail; the square resize is redone in the targets pass anyway
            with budget.hold(a):
                model.load_image(a).close()
        except ValueError as e:
            raise BadRecord("aux_images", f"entry {j}: cannot use the image: {e}") from None
    return int(grid.prod()) // vision.spatial_merge_size ** 2


def read_records(opts, vision, layout=None):
    """Validate every line of opts.data -> (good records with n_image_tokens, skipped, n_records). Blank lines
    are not records; every other line is either kept or reported. layout: see _check_fields."""
    path, good, skipped, seen = Path(opts.data), [], [], {}
    # pass 1, cheap and in order: JSON, fields, tags, ids; pass 2 below decodes the images of what survived
    for lineno, line in jsonl_lines(path):
        obj, rid = None, None
        try:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise BadRecord("json", f"not valid JSON: {e}") from None
            rid = obj.get("id") if isinstance(obj, dict) and isinstance(obj.get("id"), str) else None
            rec = _check_fields(obj, path.parent, layout)
            if rec["id"] in seen:
                raise BadRecord("id", f"duplicate of line {seen[rec['id']]}")
            seen[rec["id"]] = lineno
            good.append((lineno, rec))
        except BadRecord as e:
            skipped.append({"line": lineno, "id": rid, "field": e.field, "reason": e.reason})
    n_records = len(good) + len(skipped)

    budget = PixelBudget(opts.decode_pixels)

    def check(item):   # images are the slow part: decode them on a thread pool (PIL releases the GIL)
        try:
            return _check_images(item[1], opts, vision, budget)
        except BadRecord as e:
            return e
    with ThreadPoolExecutor(max(1, opts.workers)) as pool:
        results = list(tqdm(pool.map(check, good), total=len(good), desc="check images", disable=len(good) < 64))
    # every problem is reported with its line, in file order, whichever pass found it
    kept = []
    for (lineno, rec), r in zip(good, results):
        if isinstance(r, BadRecord):
            skipped.append({"line": lineno, "id": rec["id"], "field": r.field, "reason": r.reason})
        else:
            kept.append({**rec, "n_image_tokens": r, "line": lineno})
    skipped.sort(key=lambda s: s["line"])
    return kept, skipped, n_records


def format_bad(path, s):
    # a skipped record as the one-line error layout: "<file> line N (id X): <field>: <reason>"
    return str(data_error(path, s["field"], s["reason"], line=s["line"], rid=s["id"]))


# ---- latent targets (frozen ViT + merger on the aux images) ----


def _fingerprint(recs, opts, dtype):
    # A shard is reused on resume only if it was made from the same records, aux files, weights, N and dtype.
    stat = lambda p: [os.path.getsize(p), os.stat(p).st_mtime_ns]
    weights = sorted(str(p) for p in Path(opts.model).resolve().glob("*.safetensors"))
    key = {"model": [[w, *stat(w)] for w in weights], "n_latents": opts.latents, "dtype": str(dtype),
           "records": [[r["id"], [[a, *stat(a)] for a in r["aux_images"]]] for r in recs]}
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()


def _shard_is_done(path, fp):
    # the fingerprint sits in the shard's own safetensors metadata: a shard cut short by a crash has none
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("fingerprint") == fp
    except Exception:   # truncated or foreign file: recompute it
        return False


@torch.no_grad()
def shard_targets(visual, recs, opts, vision, device, dtype, progress=None):
    """-> {id: (n_spans, N, d) bf16} for a list of records. Aux images are batched across records, decoded on
    threads; batches never cross a shard, so a resumed shard is bit-identical to an uninterrupted one."""
    paths, budget = [a for r in recs for a in r["aux_images"]], PixelBudget(opts.decode_pixels)

    def pixels(path):
        with budget.hold(path):
            return aux_pixels(path, opts.latents, vision)
    out = []
    with ThreadPoolExecutor(max(1, opts.workers)) as pool:
        # --batch-size aux images per ViT call, each batch decoded in parallel on the thread pool first
        for s in range(0, len(paths), opts.batch_size):
            items = list(pool.map(pixels, paths[s:s + opts.batch_size]))
            pv = torch.cat([p for p, _ in items]).to(device=device, dtype=dtype)   # (B * 4N, 1176)
            grid = torch.cat([g for _, g in items]).to(device)                       # (B, 3)
            v = visual(pv, grid).view(len(items), opts.latents, -1)                 # (B, N, d) raster order
            out.extend(v.to(torch.bfloat16).cpu().unbind(0))
            if progress is not None:
                progress.update(len(items))
    targets, k = {}, 0
    for r in recs:
        n = len(r["aux_images"])
        targets[r["id"]] = torch.stack(out[k:k + n]).contiguous()   # own storage: safetensors refuses shared views
        k += n
    return targets


def write_shard(targets, path, fp):
    tmp = path.with_name(path.name + ".tmp")   # tmp + rename: a crash never leaves a half shard under its name
    save_file(targets, str(tmp), metadata={"fingerprint": fp})
    os.replace(tmp, path)


# ---- build ----


def build_setup(opts):
    """Everything that can be wrong with the options, the paths and the model folder, before any record is read.
    -> (opts with the pixel limits resolved, N per span, external encoder files, device, dtype, config, tokenizer,
    latent token ids)."""
    import valr   # lazy: valr.py imports this file
    check_options(opts)
    n_latents = opts.k if opts.layout == "valr" else opts.latents
    g = math.isqrt(max(opts.latents, 0))
    if opts.layout != "valr" and (opts.latents < 1 or g * g != opts.latents):
        raise DataError(f"--latents {opts.latents}: expected a perfect square (N = g*g latents from a g x g grid "
                        f"of merged patches, e.g. 36)")
    try:
        externals = dict(valr.parse_external(e) for e in opts.external or [])
    except ValueError as e:
        raise DataError(str(e)) from None
    out, data = Path(opts.out), Path(opts.data)
    if not data.is_file():
        raise FileNotFoundError(f"--data {data}: no such file")
    if out.resolve() == Path(opts.model).resolve() or data.resolve() == (out / "records.jsonl").resolve():
        raise data_error(out, "--out", "expected a folder other than --model that does not hold --data (the build "
                                       "writes tokenizer.json, records.jsonl, ... into it), found one that does")
    device = resolve_device(opts.device)   # a bad --device / --dtype fails now, not after the records are checked
    dtype = resolve_dtype(opts.dtype, device)
    cfg = model.Config.from_json(Path(opts.model) / "config.json")
    tok = load_tokenizer(opts.model)
    latent_ids = check_latent_ids(tok, cfg)
    pixels = resolve_pixels(opts.model, opts.min_pixels, opts.max_pixels)
    print_pixels(pixels)
    opts = replace(opts, min_pixels=pixels[0], max_pixels=pixels[1])   # image tokens are counted at these limits
    return opts, n_latents, externals, device, dtype, cfg, tok, latent_ids


def tokenize_records(opts, recs, skipped, tok, cfg, n_latents):
    """Token ids and labels of every valid record; one longer than the context is one more bad record.
    -> (kept records, {id: (input_ids, labels)}, skipped sorted by line)."""
    # every example must fit the model's context: positions past max_position_embeddings were never trained
    limit = min(opts.max_length or cfg.text.max_position_embeddings, cfg.text.max_position_embeddings)
    why = "--max-length" if limit == opts.max_length else f"max_position_embeddings of {opts.model}/config.json"
    examples = {}
    for r in recs:
        examples[r["id"]] = build_example(tok, r["question"], r["response"], r["n_image_tokens"], n_latents)
        n = len(examples[r["id"]][0])
        if n > limit:
            skipped.append({"line": r["line"], "id": r["id"], "field": "length", "reason": f"expected at most "
                            f"{limit} tokens ({why}), found {n} ({r['n_image_tokens']} of them image tokens)"})
    skipped.sort(key=lambda s: s["line"])
    return [r for r in recs if len(examples[r["id"]][0]) <= limit], examples, skipped


def write_records(out, data, opts, recs, examples):
    """records.jsonl (what train.py reads), after checking that the layout has latent spans where it should."""
    rows = []
    for r in recs:
        input_ids, labels = examples[r["id"]]
        rows.append({"id": r["id"], "image": r["image"], "input_ids": input_ids, "labels": labels,
                     "n_spans": r["response"].count(LATENT_PLACEHOLDER), "accuracy": r["accuracy"],
                     "answer": r["answer"], "question": r["question"], "response": r["response"],
                     "aux_images": r["aux_images"]})
    model.write_text_atomic(out / "records.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    if opts.layout == "text" and any(row["n_spans"] for row in rows):
        first = next(row for row in rows if row["n_spans"])
        raise DataError(f"{data} (id {first['id']}): response: --layout text expects no {LATENT_PLACEHOLDER}, "
                        f"found {first['n_spans']}")
    if opts.layout != "text" and not any(row["n_spans"] for row in rows):
        raise DataError(f"{data}: no record has a latent span ({LATENT_PLACEHOLDER}"
                        + (" or a reasoning step" if opts.layout == "valr" else "") + "); nothing to train the "
                        "latents on")
    return rows


def write_targets(out, opts, recs, cfg, device, dtype):
    """The latent targets, shard by shard. A shard whose fingerprint matches is kept (resume after a crash); the ViT
    is only loaded if some shard is missing, and only the tower is kept: the decoder's weights are freed right away.
    -> shard file names."""
    with_spans = [r for r in recs if r["aux_images"]]
    chunks = [with_spans[i:i + opts.shard_size] for i in range(0, len(with_spans), opts.shard_size)]
    shards, visual = [], None
    bar = tqdm(total=sum(len(r["aux_images"]) for r in with_spans), desc="targets", unit="img")
    for i, chunk in enumerate(chunks):
        name, fp = f"targets-{i:05d}.safetensors", _fingerprint(chunk, opts, dtype)
        shards.append(name)
        if _shard_is_done(out / name, fp):
            bar.update(sum(len(r["aux_images"]) for r in chunk))
            continue
        if visual is None:
            visual = model.load_pretrained(opts.model, dtype=dtype, device=device).visual
        write_shard(shard_targets(visual, chunk, opts, cfg.vision, device, dtype, bar), out / name, fp)
    bar.close()
    for stale in out.glob("targets-*.safetensors*"):   # leftovers of an earlier, larger build or a crashed write
        if stale.name not in shards:
            stale.unlink()
    return shards


def fit_pca(out, shards, dim, variance, device):
    """PCA over every target row (Eq. 1), streamed shard by shard; fp32 rows into a float64 accumulator. Also the
    mean L2 norm of the targets: the vision-norm regime the latents must live in. -> (basis, mean norm)."""
    fitter = latent_head.PCAFitter(dim)
    norm_sum, n_rows = 0.0, 0
    for name in tqdm(shards, desc="pca", unit="shard", disable=len(shards) < 2):
        with safe_open(str(out / name), framework="pt") as f:
            rows = torch.cat([f.get_tensor(k).reshape(-1, dim) for k in f.keys()])    # (n_targets, d)
        fitter.update(rows.to(device).float())
        norm_sum, n_rows = norm_sum + float(rows.float().norm(dim=-1).sum()), n_rows + rows.shape[0]
    basis = fitter.finish(variance)
    basis.save(out / "pca.safetensors")
    return basis, norm_sum / n_rows


def build(opts):
    """Validate, tokenize, compute targets, fit the PCA, write the prepared folder. Returns the manifest.
    --layout valr (VaLR) instead puts a K-latent block before each reasoning step and has no ViT targets and no PCA:
    its latents are the model's own outputs fed back, aligned by REPA to the --external encoders' features."""
    import valr   # lazy: valr.py imports this file
    # ---- options, paths, model folder; then every record, checked before anything is written ----
    opts, n_latents, externals, device, dtype, cfg, tok, latent_ids = build_setup(opts)
    out, data = Path(opts.out), Path(opts.data)
    recs, skipped, n_records = read_records(opts, cfg.vision, valr.layout if opts.layout == "valr" else None)
    recs, examples, skipped = tokenize_records(opts, recs, skipped, tok, cfg, n_latents)
    for s in skipped:
        print(format_bad(data, s), file=sys.stderr)
    if skipped and not opts.skip_bad:
        raise DataError(f"{len(skipped)} bad record(s); the first: {format_bad(data, skipped[0])} "
                        f"(fix them, or pass --skip-bad to leave them out and list them in the manifest)")
    if not recs:
        raise data_error(data, "records", "expected at least one usable record, found none")

    # ---- the records, and the external encoder features (before the slow ViT pass, so a bad file fails fast) ----
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)   # the manifest marks a complete build: not until the end
    tok.save(str(out / "tokenizer.json"))
    rows = write_records(out, data, opts, recs, examples)
    blocks = [(row["id"], row["n_spans"]) for row in rows if row["n_spans"]]
    try:
        external = {name: valr.store_external(name, path, blocks, out, opts.shard_size)
                    for name, path in externals.items()}
    except ValueError as e:
        raise DataError(str(e)) from None
    manifest = {"n_records": n_records, "n_kept": len(recs), "n_latents": n_latents, "layout": opts.layout,
                "latent_ids": {"start": latent_ids[LATENT_TOKENS[0]], "pad": latent_ids[LATENT_TOKENS[1]],
                               "end": latent_ids[LATENT_TOKENS[2]]},
                "skipped": skipped, "model": str(Path(opts.model).resolve()), "data": str(data.resolve()),
                "n_spans": sum(r["n_spans"] for r in rows), "image_min_pixels": opts.min_pixels,
                "image_max_pixels": opts.max_pixels, "external": external, "shards": [], "pca": None}
    if opts.layout != "gap":   # valr, text: no ViT targets, no PCA: the folder is complete
        for stale in [*out.glob("targets-*.safetensors*"), out / "pca.safetensors"]:
            stale.unlink(missing_ok=True)
        model.write_text_atomic(out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
        print(f"build: kept {len(recs)}/{n_records} records ({len(skipped)} skipped), " + (
              f"{manifest['n_spans']} blocks of K={n_latents} latents, external encoders {sorted(external) or 'none'}"
              if opts.layout == "valr" else "plain text") + f" -> {out}")
        return manifest

    # ---- GAP: the latent targets through the frozen ViT, then the PCA basis over them ----
    shards = write_targets(out, opts, recs, cfg, device, dtype)
    basis, target_norm = fit_pca(out, shards, cfg.vision.out_hidden_size, opts.pca_variance, device)
    manifest.update(pca={"k": basis.k, "variance": basis.variance, "relmse": basis.relmse()}, shards=shards,
                    target_dim=cfg.vision.out_hidden_size, target_norm=target_norm)
    # written last: its presence marks a finished build
    model.write_text_atomic(out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    print(f"build: kept {len(recs)}/{n_records} records ({len(skipped)} skipped), {manifest['n_spans']} spans in "
          f"{len(shards)} shard(s), PCA k={basis.k}/{basis.d} (RelMSE {basis.relmse():.4f}) -> {out}")
    return manifest


# ---- score (difficulty scoring with the base model) ----
# `accuracy` = the base model's mean correctness over N samples (the paper: 8 samples, tau = 0 keeps latent
# supervision only for examples it never solves). Sampling and grading live in sample.py / eval.py; this is the
# command-line door to them. The synthetic generator instead sets `accuracy` from its own difficulty knobs (below).


def score(opts):
    check_options(opts)
    import eval as evaluation   # lazy: eval.py imports this file for the tokenizer and template
    out = evaluation.score_file(opts.model, opts.data, samples=opts.samples, out_file=opts.out,
                                temperature=opts.temperature, max_new_tokens=opts.max_new_tokens, seed=opts.seed,
                                device=opts.device, pixels=(opts.min_pixels, opts.max_pixels), workers=opts.workers)
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"score: wrote {out}")
        print(solved_summary([json.loads(line) for _, line in jsonl_lines(out)], opts.samples))


def solved_summary(rows, samples):
    """How many records the base solved at least once, per category: what tau = 0 turns into text-only records."""
    by_cat = {}
    for r in rows:
        by_cat.setdefault(str(r.get("category") or "all"), []).append(r["accuracy"] > 0)
    parts = ", ".join(f"{c} {sum(v)}/{len(v)}" for c, v in sorted(by_cat.items()))
    n = sum(sum(v) for v in by_cat.values())
    return (f"score: solved at least once in {samples} samples: {parts} (the other {len(rows) - n} scored 0: tau = 0 "
            f"keeps their latent spans)")


# ---- synthetic dataset: three toy tasks in the spirit of the paper ----
# Each example's question needs a detail that is hard to read off the small question image; its auxiliary image
# makes that detail explicit (objects of one colour highlighted, a tiny region zoomed in, one object isolated on a
# blank canvas), which is exactly what a latent span is meant to carry. `accuracy` stands in for `prepare.py score`
# with a trained base model: 0.0 when the generator made the example hard (many objects, an 8 px letter, many
# decoys, the two objects in neighbouring rows/columns), else 1.0 -- about half each. train.py keeps the latent
# spans of records with accuracy <= tau (hard ones) and strips them from the rest.

COLORS = {"red": (220, 40, 40), "green": (30, 150, 60), "blue": (40, 80, 220), "yellow": (225, 190, 20),
          "purple": (140, 60, 180), "orange": (240, 130, 30)}
SHAPES = ("circle", "square", "triangle")
LETTERS = "ABCDEFGHJKLMNPQRSTUVWXYZ"   # no I/O: too close to 1/0 at 8 px
SIZES = (112, 140, 168, 196, 224)      # multiples of 28: 16..64 image tokens, no smart_resize rounding
GRID = 4                               # objects sit in distinct cells of a 4x4 grid, so they never overlap


def _cells(rng, S, n):
    """n distinct random cells -> [(cx, cy, cell)], centres jittered by 10% of a cell."""
    c = S / GRID
    return [((k % GRID + 0.5 + rng.uniform(-0.1, 0.1)) * c, (k // GRID + 0.5 + rng.uniform(-0.1, 0.1)) * c, k)
            for k in rng.sample(range(GRID * GRID), n)]


def _shape(draw, shape, cx, cy, r, fill=None, outline=None):
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "circle":
        draw.ellipse(box, fill=fill, outline=outline, width=2)
    elif shape == "square":
        draw.rectangle(box, fill=fill, outline=outline, width=2)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill, outline=outline, width=2)


def _canvas(S):
    img = Image.new("RGB", (S, S), (255, 255, 255))
    return img, ImageDraw.Draw(img)


def _count(rng, S):
    # k shapes of the asked colour among d distractors of other colours
    color, k, d = rng.choice(sorted(COLORS)), rng.randint(1, 6), rng.randint(0, 8)
    others, r = [c for c in sorted(COLORS) if c != color], S / GRID * rng.uniform(0.25, 0.38)
    (img, di), (aux, da) = _canvas(S), _canvas(S)
    for j, (cx, cy, _) in enumerate(_cells(rng, S, k + d)):
        shape, c = rng.choice(SHAPES), color if j < k else rng.choice(others)
        _shape(di, shape, cx, cy, r, fill=COLORS[c])
        # aux: the counted objects keep their colour, the rest become faint outlines
        _shape(da, shape, cx, cy, r, **({"fill": COLORS[c]} if c == color else {"outline": (215, 215, 215)}))
    q = f"How many {color} shapes are in the image?"
    resp = (f"<think>I need to count the {color} shapes. {LATENT_PLACEHOLDER} <parser>the aux image keeps the "
            f"{color} shapes and greys out the rest: I count {k}</parser> so there are {k} {color} shapes."
            f"</think><answer>{k}</answer>")
    return img, [aux], q, resp, str(k), k >= 5 or d >= 7   # hard: many to count, or many distractors


def _search(rng, S):
    # one letter in a small coloured frame, grey decoy letters without a frame, faint clutter shapes
    fs, frame, letter = rng.choice((8, 10, 12)), rng.choice(sorted(COLORS)), rng.choice(LETTERS)
    # Pillow's embedded font: the same glyphs on every machine, no font files needed
    font, side, n_decoys, n_clutter = ImageFont.load_default(size=fs), fs + 6, rng.randint(0, 6), rng.randint(2, 7)
    img, draw = _canvas(S)
    (fx, fy, _), *rest = _cells(rng, S, 1 + n_decoys + n_clutter)
    for cx, cy, _ in rest[n_decoys:]:   # faint clutter shapes
        pale = tuple(int(255 - 0.25 * (255 - v)) for v in COLORS[rng.choice(sorted(COLORS))])
        _shape(draw, rng.choice(SHAPES), cx, cy, S / GRID * 0.3, fill=pale)
    for cx, cy, _ in rest[:n_decoys]:   # grey decoy letters without a frame
        draw.text((cx, cy), rng.choice(LETTERS), fill=(110, 110, 110), font=font, anchor="mm")
    x0, y0 = round(fx - side / 2), round(fy - side / 2)
    draw.rectangle([x0, y0, x0 + side, y0 + side], outline=COLORS[frame], width=1)
    draw.text((x0 + side / 2, y0 + side / 2), letter, fill=(0, 0, 0), font=font, anchor="mm")
    m = 6   # the aux image: the frame and a margin, zoomed to the latent target size
    aux = img.crop((x0 - m, y0 - m, x0 + side + m, y0 + side + m)).resize((168, 168), Image.BICUBIC)
    q = f"Which letter is written inside the small {frame} square?"
    resp = (f"<think>The {frame} square is too small to read at this size. {LATENT_PLACEHOLDER} <parser>the aux "
            f"image zooms into the {frame} square and shows the letter {letter}</parser> so the letter is {letter}."
            f"</think><answer>{letter}</answer>")
    return img, [aux], q, resp, letter, fs == 8 or n_decoys >= 5   # hard: an 8 px font, or many decoys


def _spatial(rng, S):
    # two named objects (colour + shape) and d decoys; the question compares their columns (x) or rows (y)
    combos = [(c, s) for c in sorted(COLORS) for s in SHAPES]
    (a, b), axis, d = rng.sample(combos, 2), rng.choice("xy"), rng.randint(1, 6)
    pos = lambda k: k % GRID if axis == "x" else k // GRID   # column or row of a cell
    cells = _cells(rng, S, 2 + d)
    while pos(cells[0][2]) == pos(cells[1][2]):   # A and B must differ along the asked axis
        cells = _cells(rng, S, 2 + d)
    specs = [a, b] + [rng.choice([x for x in combos if x not in (a, b)]) for _ in range(d)]
    r = S / GRID * rng.uniform(0.25, 0.38)
    img, draw = _canvas(S)
    for (c, shape), (cx, cy, _) in zip(specs, cells):
        _shape(draw, shape, cx, cy, r, fill=COLORS[c])
    auxes, where = [], []
    for (c, shape), (cx, cy, _) in zip(specs[:2], cells):   # each aux: one object alone, in place, on a faint grid
        aux, da = _canvas(S)
        for i in range(1, GRID):
            da.line([(i * S / GRID, 0), (i * S / GRID, S)], fill=(225, 225, 225))
            da.line([(0, i * S / GRID), (S, i * S / GRID)], fill=(225, 225, 225))
        _shape(da, shape, cx, cy, r, fill=COLORS[c])
        auxes.append(aux)
        where.append(f"at {round(100 * cx / S)}% from the left and {round(100 * cy / S)}% from the top")
    (na, nb), ka, kb = (" ".join(a), " ".join(b)), pos(cells[0][2]), pos(cells[1][2])
    yes = ka < kb
    rel = ("left of" if yes else "right of") if axis == "x" else ("above" if yes else "below")
    q = f"Is the {na} to the left of the {nb}?" if axis == "x" else f"Is the {na} above the {nb}?"
    resp = (f"<think>First I find the {na}. {LATENT_PLACEHOLDER} <parser>the first aux image shows the {na} "
            f"{where[0]}</parser> Then the {nb}. {LATENT_PLACEHOLDER} <parser>the second aux image shows the {nb} "
            f"{where[1]}</parser> so the {na} is {rel} the {nb}.</think><answer>{'yes' if yes else 'no'}</answer>")
    hard = abs(ka - kb) == 1   # the two objects in neighbouring rows / columns
    return img, auxes, q, resp, "yes" if yes else "no", hard


FAMILIES = {"count": _count, "search": _search, "spatial": _spatial}


def make_example(i, seed, raw):
    """Example i (family i mod 3) from its own RNG, so it does not depend on n or on the other examples."""
    name = list(FAMILIES)[i % len(FAMILIES)]
    rng = random.Random(seed * 1_000_003 + i)
    img, auxes, q, resp, answer, hard = FAMILIES[name](rng, rng.choice(SIZES))
    rid = f"{name}-{i:05d}"
    img.save(raw / "images" / f"{rid}.png")
    for j, aux in enumerate(auxes):
        aux.save(raw / "aux" / f"{rid}-{j}.png")
    return {"id": rid, "image": f"images/{rid}.png", "question": q, "response": resp,
            "aux_images": [f"aux/{rid}-{j}.png" for j in range(len(auxes))], "answer": answer,
            "accuracy": 0.0 if hard else 1.0, "category": f"{name}-{'hard' if hard else 'easy'}"}


# Qwen2's pre-tokenizer split (digits one by one, as in Qwen), applied before byte-level BPE
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
              r"\s*[\r\n]+|\s+(?!\S)|\s+")
N_REGULAR = 643   # Qwen's 151643 regular tokens, minus 151000: every special token sits at its Qwen id - 151000


def train_tokenizer(texts):
    """Byte-level BPE laid out like Qwen's: exactly 643 regular tokens (ids 0..642; placeholders fill the rest if
    the corpus yields fewer merges), then the 22 Qwen specials at 643..664, so the latent tokens get 665..667."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=N_REGULAR, show_progress=False, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    d = json.loads(tok.to_str())
    vocab = d["model"]["vocab"]
    for j in range(N_REGULAR - len(vocab)):   # no merge produces these, so they are never emitted
        vocab[f"<|placeholder_{j}|>"] = len(vocab)
    d["added_tokens"] = [{"id": N_REGULAR + j, "content": t, "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True}
                         for j, t in enumerate(QWEN_SPECIAL_TOKENS)]
    tok = Tokenizer.from_str(json.dumps(d))
    assert len(vocab) == N_REGULAR and tok.token_to_id("<|image_pad|>") == N_REGULAR + 12, "Qwen layout broken"
    return tok


def make_tiny_model(tok, seed):
    """The demo's base model: PRESETS["tiny"] widened to text hidden 128, 4 layers, 4 heads (head_dim 32, M-RoPE
    (4, 6, 6) = Qwen's (16, 24, 24) / 4), 2 KV heads, SwiGLU 256: 0.97M parameters, enough for the toy tasks to
    show learning in a few CPU minutes. The ViT stays tiny (depth 4, width 32) and frozen; its merger outputs 128
    wide. Weights N(0, 0.02) like HF's init (this model is trained, not an oracle), norms 1, biases 0."""
    base = model.PRESETS["tiny"]
    text = replace(base.text, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, mrope_section=(4, 6, 6))
    return random_model(text, replace(base.vision, out_hidden_size=text.hidden_size), tok, seed)


def random_model(text, vision, tok, seed):
    """A Qwen25VL with these text / vision configs and the tokenizer's special-token ids, initialised like HF's init
    (weights N(0, 0.02), norm weights 1, biases 0): a model that is trained, not an oracle."""
    t = tok.token_to_id
    cfg = replace(model.PRESETS["tiny"], text=text, vision=vision, image_token_id=t("<|image_pad|>"),
                  video_token_id=t("<|video_pad|>"), vision_start_token_id=t("<|vision_start|>"),
                  vision_end_token_id=t("<|vision_end|>"), bos_token_id=t("<|endoftext|>"),
                  eos_token_id=t("<|im_end|>"))
    m = model.Qwen25VL(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(m.named_parameters()):   # sorted: the draw order is fixed by the names
            if name.endswith(".bias"):
                p.zero_()
            elif p.ndim == 1:   # RMSNorm weights are the only 1-D weights
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return m


def synthetic(opts):
    check_options(opts)
    if opts.task != "classic":
        return synthetic_tiles(opts)
    out = Path(opts.out)
    raw = out / "raw"
    for sub in ("images", "aux"):
        (raw / sub).mkdir(parents=True, exist_ok=True)
    recs = [make_example(i, opts.seed, raw) for i in tqdm(range(opts.n), desc="synthetic", disable=opts.n < 100)]
    order = list(range(opts.n))
    random.Random(opts.seed).shuffle(order)
    test = set(order[:round(opts.n * opts.test_frac)])
    for name, keep in (("train", lambda i: i not in test), ("test", lambda i: i in test)):
        model.write_text_atomic(raw / f"{name}.jsonl",
                                "".join(json.dumps(r) + "\n" for i, r in enumerate(recs) if keep(i)))

    # tokenizer on all synthetic text plus the template's own words (like a base model's, which saw everything)
    texts = ["system\n" + SYSTEM_PROMPT, "user\n", "assistant\n", "\n"]
    for r in recs:
        texts += [r["question"], r["answer"], *r["response"].split(LATENT_PLACEHOLDER)]
    tok = train_tokenizer(texts)
    m = make_tiny_model(tok, opts.seed)
    model.save_pretrained(m, out / "model")
    tok.save(str(out / "model" / "tokenizer.json"))   # no latent tokens yet, like a hub checkpoint
    n_params = sum(p.numel() for p in m.parameters())
    print(f"synthetic: {opts.n} examples ({opts.n - len(test)} train, {len(test)} test) -> {raw}; "
          f"model {n_params / 1e6:.2f}M params -> {out / 'model'}")
    return build(BuildOptions(data=str(raw / "train.jsonl"), model=str(out / "model"), out=str(out / "prepared"),
                              latents=opts.latents, device=opts.device))


def synthetic_tiles(opts):
    """The tile miniature (synthetic.py). base: single-hop questions, the shared tokenizer, a random base model, and
    a plain-text build (the base is trained without latents). tiles: the demo's raw/ split only, because its
    `accuracy` comes from scoring the trained base (`prepare.py score`) before `prepare.py build`."""
    import synthetic as tiles
    out = Path(opts.out)
    raw = out / "raw"
    for sub in ("images", "aux"):
        (raw / sub).mkdir(parents=True, exist_ok=True)
    mix = tiles.BASE_MIX if opts.task == "base" else tiles.TILES_MIX
    recs = [tiles.make_example(i, opts.seed, raw, mix, opts.latents)
            for i in tqdm(range(opts.n), desc=f"synthetic {opts.task}", disable=opts.n < 100)]
    n_test = round(opts.n * opts.test_frac)
    for name, part in (("train", recs[n_test:]), ("test", recs[:n_test])):   # i.i.d. examples: no shuffle needed
        model.write_text_atomic(raw / f"{name}.jsonl", "".join(json.dumps(r) + "\n" for r in part))
    print(f"synthetic {opts.task}: {opts.n} examples ({opts.n - n_test} train, {n_test} test) -> {raw}")
    if opts.task == "tiles":
        return None
    tok = tiles.make_tokenizer()
    m = tiles.make_model(tok, opts.seed)
    model.save_pretrained(m, out / "model")
    tok.save(str(out / "model" / "tokenizer.json"))
    print(f"synthetic base: model {sum(p.numel() for p in m.parameters()) / 1e6:.2f}M params -> {out / 'model'}")
    return build(BuildOptions(data=str(raw / "train.jsonl"), model=str(out / "model"), out=str(out / "prepared"),
                              latents=opts.latents, device=opts.device, layout="text"))


# ---- command line ----


def main(argv=None):
    parser = Parser(description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, cls, fn, help_ in (
            ("build", BuildOptions, build, "validate a JSONL dataset, tokenize, compute latent targets, fit PCA"),
            ("synthetic", SyntheticOptions, synthetic, "write toy tasks, a tiny random checkpoint, and build them"),
            ("score", ScoreOptions, score, "difficulty scoring: accuracy of N base-model samples per record")):
        sp = sub.add_parser(name, help=help_, description=help_)
        add_options(sp, cls)
        sp.set_defaults(cls=cls, fn=fn)
    import convert   # lazy: convert.py imports this file
    sp = sub.add_parser("convert", help="Monet SFT / box-grounded CoT -> gap JSONL", description=convert.__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    convert.add_arguments(sp)
    sp.set_defaults(cls=convert.ConvertOptions, fn=convert.convert)
    args = parser.parse_args(argv)
    return args.fn(args.cls(**{f.name: getattr(args, f.name) for f in fields(args.cls)}))


if __name__ == "__main__":
    run_main(main)
    if torch.distributed.is_initialized():   # score under torchrun
        torch.distributed.destroy_process_group()
