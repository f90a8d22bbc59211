"""Benchmark runner for GAP: accuracy under feedback interventions, the latent-budget sweep, latency, and the
layer-wise norm profile (the paper's Fig. 2). Data: our JSONL (README "Data format": id, image, question, answer,
category optional; paths relative to the file) or a VLMEvalKit TSV (index, image as base64, question, A, B, ...
options, answer, category).

    python eval.py --model out/gap --data data/synthetic/raw/test.jsonl --modes pca,zero,noise,raw --latents 0,4,16,36
    python eval.py --model out/gap-7b --data MathVista_MINI.tsv --device cuda --batch-size 16 --out out/mathvista
    python eval.py --model out/gap-7b --data MMStar.tsv --scoring vlmeval --min-pixels 1003520 --max-pixels 12845056
    python eval.py norms --model out/gap --data data/synthetic/raw/test.jsonl --limit 16 --out out/norms
    python eval.py oracle --model out/gap --data PREPARED_DIR        # can the model read true aux-image latents?
    python eval.py summary out/demo/eval-gap-1 out/demo/eval-gap-2 --json out/demo/summary.json   # over seeds
    torchrun --standalone --nproc_per_node=8 eval.py --model out/gap-7b --data MathVista_MINI.tsv --batch-size 16

Outputs under --out: predictions-<mode>-<latents>.jsonl per run, results.json (both tables), norms.json/norms.png.
score_file() is the difficulty scorer behind `prepare.py score` (N samples of the base model per record).
"""
import dataclasses
import json
import math
import os
import re
import string
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import model
import prepare
import sample
import vlmevalkit

# ---------------------------------------------------------------------------------------------------------------
# ---- options ----


@dataclass
class EvalOptions:
    model: str = field(metadata={"help": "train.py output folder (gap.json) or a plain HF checkpoint"})
    data: str = field(metadata={"help": "JSONL (paths relative to it) or VLMEvalKit TSV (base64 images)"})
    modes: str = field(default="auto", metadata={"help": "comma list of pca,full,raw,zero,noise for the intervention "
                                                         "table; auto = pca,zero,noise,raw minus what the folder lacks"})
    latents: str = field(default="", metadata={"help": "comma list of N for the budget sweep (0 = zero mode); "
                                                       "empty = no sweep"})
    sweep_mode: str = field(default="auto", metadata={"help": "feedback mode of the sweep; auto = the folder's head"})
    limit: int = field(default=0, metadata={"min": 0, "help": "first N records only (0 = all)"})
    batch_size: int = field(default=1, metadata={"min": 1, "help": "rows per generate call; a sample's latency is its "
                                                          "batch's wall time (what its caller waits)"})
    out: str = field(default="out/eval", metadata={"help": "output folder"})
    max_new_tokens: int = field(default=256, metadata={"min": 1, "help": "positions generated, latents included"})
    temperature: float = field(default=0.0, metadata={"min": 0, "help": "0 = greedy"})
    top_p: float = field(default=1.0, metadata={"above": 0, "max": 1, "help": "nucleus sampling mass"})
    ema_norm: bool = field(default=False, metadata={"help": "EMA norm calibration of every fed-back latent"})
    seed: int = field(default=0, metadata={"help": "sampling / noise seed"})
    device: str = prepare.device_option()
    dtype: str = prepare.dtype_option()
    min_pixels: int = field(default=-1, metadata={"help": "smart_resize min_pixels; -1 = gap.json's (the trained "
                                                          "resolution), else preprocessor_config.json's"})
    max_pixels: int = field(default=-1, metadata={"help": "smart_resize max_pixels; -1 = as for min_pixels"})
    workers: int = field(default=4, metadata={"min": 0, "help": "threads decoding and preprocessing the next batches' images"})
    compile: str = field(default="auto", metadata={"help": "compiled decode step: auto (on CUDA) | yes | no"})
    scoring: str = field(default="auto", metadata={
        "choices": ("auto", "gap", "vlmeval"),
        "help": "gap: lenient answer extraction (<answer> tags, 'the answer is', 1%% numeric tolerance); vlmeval: "
                "VLMEvalKit's exact matching (vlmevalkit.py); auto: vlmeval for a TSV, gap for JSONL"})


@dataclass
class NormsOptions:
    model: str = field(metadata={"help": "train.py output folder or a plain HF checkpoint"})
    data: str = field(metadata={"help": "JSONL or VLMEvalKit TSV"})
    limit: int = field(default=16, metadata={"min": 0, "help": "records to profile"})
    out: str = field(default="out/norms", metadata={"help": "output folder (norms.json, norms.png)"})
    device: str = prepare.device_option()
    dtype: str = prepare.dtype_option()
    min_pixels: int = field(default=-1, metadata={"help": "smart_resize min_pixels; -1 = the folder's"})
    max_pixels: int = field(default=-1, metadata={"help": "smart_resize max_pixels; -1 = the folder's"})


@dataclass
class OracleOptions:
    model: str = field(metadata={"help": "train.py output folder or a plain HF checkpoint"})
    data: str = field(metadata={"help": "a prepared folder (prepare.py build) with the same tokenizer"})
    limit: int = field(default=0, metadata={"help": "first N records with spans (0 = all)"})
    batch_size: int = field(default=32, metadata={"help": "records per forward"})
    out: str = field(default=None, metadata={"help": "also write OUT/results.json (modes true_latents, no_latents: "
                                                     "what `eval.py summary` reads)"})
    device: str = prepare.device_option()


# ---------------------------------------------------------------------------------------------------------------
# ---- data: our JSONL and VLMEvalKit TSV ----


def read_jsonl(path, need_answer=True):
    """-> list of records {id, image (path), question, answer, category, choices, response, raw}. Ids must be
    unique: they key the predictions and the scores."""
    path, records, seen = Path(path), [], {}
    for lineno, line in prepare.jsonl_lines(path):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise prepare.data_error(path, "json", f"expected valid JSON, found an error ({e})", line=lineno) from None
        if not isinstance(obj, dict):
            raise prepare.data_error(path, "record", f"expected a JSON object, found {type(obj).__name__}",
                                     line=lineno)
        rid = str(obj.get("id", f"line-{lineno}"))
        bad = lambda name, what: prepare.data_error(path, name, what, line=lineno, rid=rid)
        if rid in seen:
            raise bad("id", f"expected a unique id, found the id of line {seen[rid]} again")
        seen[rid] = lineno
        for name in ("image", "question") + (("answer",) if need_answer else ()):
            v = obj.get(name)
            if v is None or (isinstance(v, str) and not v.strip()) or isinstance(v, (dict, list, bool)):
                raise bad(name, f"expected a non-empty string, found {v!r}")
        image = path.parent / obj["image"]
        if not image.is_file():
            raise bad("image", f"expected an image file, found no file at {image}")
        records.append({"id": rid, "image": str(image), "question": obj["question"],
                        "answer": None if obj.get("answer") is None else str(obj["answer"]),
                        "category": str(obj.get("category") or "all"), "choices": obj.get("choices"),
                        "response": obj.get("response"), "raw": obj})
    return records


def read_tsv(path):
    """A VLMEvalKit TSV, read, prompted and checked (every image decoded) as vlmevalkit.read_records does; rows
    without an answer are kept (predictions are written, nothing is scored)."""
    return vlmevalkit.read_records(path)[0]


def read_data(path, need_answer=True):
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".json"):
        return read_jsonl(path, need_answer)
    if suffix != ".tsv":
        raise prepare.data_error(path, "format", f"expected a .jsonl or .tsv file, found {suffix!r}")
    return read_tsv(path)   # unique indexes are checked there, before the images are decoded


def record_image(rec):
    """A path for JSONL records; the decoded PIL image for TSV ones (VLMEvalKit's convert("RGB") rules)."""
    if rec.get("image_b64") is None:
        return rec["image"]
    path, line = rec["where"]
    return vlmevalkit.decode_image(rec["image_b64"], path, line=line, rid=rec["id"])


# ---------------------------------------------------------------------------------------------------------------
# ---- answer extraction and scoring ----

# a number as answers write it: thousands-separated (1,234.5) first, since at the same start the first alternative
# wins and a plain -?\d+ would stop at '1'; then integers, decimals and fractions (3/4); then a bare '.5'
_NUM = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def answer_span(text):
    """Content of the last <answer>...</answer> if there is one, else the whole text (stripped)."""
    found = re.findall(r"<answer>(.*?)</answer>", text, flags=re.S | re.I)
    return (found[-1] if found else text).strip()


def parse_number(s):
    """'1,234.5' -> 1234.5, '-3' -> -3.0, '3/4' -> 0.75, '12%' -> 12.0; None if s is not one number."""
    s = s.strip().rstrip(".").replace("$", "").replace("%", "").strip()
    if not _NUM.fullmatch(s):
        return None
    s = s.replace(",", "")
    if "/" in s:
        a, b = s.split("/")
        return float(a) / float(b) if float(b) != 0 else None
    return float(s)


def extract_choice(text, letters=None, choices=None):
    """The choice letter a response commits to, or None. Most specific patterns first, so that the article "A" in
    running text is only taken as a letter when nothing else matches and it is the only candidate."""
    letters = set(letters or string.ascii_uppercase)
    t = text.strip()
    pats = [r"^\(?([A-Z])\)?[.:)]?$",                                      # "B", "(B)", "B."
            r"answer(?:\s+is)?\s*[:：]?\s*\(?([A-Z])\)?(?![A-Za-z])",        # "The answer is (B)", "Answer: B"
            r"^\(?([A-Z])\)?[.:)]\s",                                       # "B. a cat"
            r"\(([A-Z])\)"]                                                 # "... (B) ..."
    for p in pats:
        for m in re.finditer(p, t, flags=re.I if p.startswith("answer") else 0):
            if m.group(1) in letters:
                return m.group(1)
    alone = {c for c in re.findall(r"\b([A-Z])\b", t) if c in letters}
    if len(alone) == 1:
        return alone.pop()
    if choices:                                                             # the option's text instead of its letter
        hits = [c for c, opt in choices.items() if normalize(opt) and normalize(opt) in normalize(t)]
        if len(hits) == 1:
            return hits[0]
    return None


def normalize(s):
    # SQuAD's answer normalisation: lower case, punctuation and articles dropped, runs of spaces collapsed
    s = s.lower().strip()
    s = "".join(ch for ch in s if ch not in string.punctuation)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def score(prediction, answer, choices=None):
    """-> (correct, extracted). The reference's form picks the extractor: a choice letter, a number (relative
    tolerance 1e-2), yes/no; otherwise a normalised string compare."""
    pred, ref = answer_span(prediction).replace("\u2212", "-"), str(answer).strip()   # U+2212 minus sign
    if re.fullmatch(r"\(?[A-Z]\)?\.?", ref) and (choices or len(ref.strip("().")) == 1):
        letter = ref.strip("().")
        got = extract_choice(pred, letters=(choices or {}).keys() or None, choices=choices)
        return got == letter, got or ""
    ref_num = parse_number(ref)
    if ref_num is not None:
        # "the answer is N" wins; else the last number, since a chain of thought states its intermediate values first
        m = re.search(r"answer\s+is\s*[:：]?\s*(" + _NUM.pattern + ")", pred, flags=re.I)
        nums = [m.group(1)] if m else _NUM.findall(pred)
        if not nums:
            return False, ""
        got = parse_number(nums[-1])
        # 1% relative: rounded answers such as 33.3 for 100/3 or 3.14 for pi count as right
        ok = got is not None and math.isclose(got, ref_num, rel_tol=1e-2, abs_tol=1e-9)
        return ok, nums[-1]
    if normalize(ref) in ("yes", "no"):
        # the first yes/no: a response that commits usually opens with it and may mention the other word later
        m = re.search(r"\b(yes|no)\b", pred, flags=re.I)
        got = m.group(1).lower() if m else ""
        return got == normalize(ref), got
    return normalize(pred) == normalize(ref), pred


def score_record(rec, text, scoring, dataset):
    """-> (score in [0, 1] or None for a record without an answer, what was extracted). vlmeval scores the text as
    VLMEvalKit would see it: the decoded tokens without special tokens, so latent spans vanish."""
    if rec["answer"] is None:
        return None, ""
    if scoring == "vlmeval":
        return vlmevalkit.score(text.replace(prepare.LATENT_PLACEHOLDER, ""), rec, dataset)
    ok, got = score(text, rec["answer"], rec.get("choices"))
    return float(ok), got


def resolve_scoring(opts, records):
    """-> (scoring, note). auto: vlmeval for a TSV whose task VLMEvalKit's exact matching covers, else gap."""
    is_tsv = Path(opts.data).suffix.lower() == ".tsv"
    scoring = opts.scoring if opts.scoring != "auto" else ("vlmeval" if is_tsv else "gap")
    if scoring != "vlmeval" or all(r["answer"] is None for r in records):   # a test split: nothing to score
        return scoring, None
    if not is_tsv:
        raise prepare.data_error(opts.data, "scoring", "expected a VLMEvalKit .tsv for --scoring vlmeval, found "
                                                       "another format")
    try:
        vlmevalkit.check_supported(records[0]["kind"], opts.data)
    except prepare.DataError as e:
        if opts.scoring == "vlmeval":
            raise
        return "gap", f"{e}; --scoring auto falls back to gap"
    return scoring, None


# ---------------------------------------------------------------------------------------------------------------
# ---- many GPUs (torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; one process runs the same code) ----
# Work is split in units (eval: batches, so each batch has the rows and the seed one process would give it; score:
# records). Rank r takes units r, r + G, r + 2G, ...; each rank appends finished units to its own part file, and
# rank 0 merges the parts in data order into exactly the file one process writes. Parts survive a crash: a rerun,
# with any number of ranks, skips every unit found in any part.


def dist_setup(device="auto"):
    """-> (rank, world, device). Under torchrun "auto" is cuda:LOCAL_RANK (gloo on CPU, NCCL on CUDA)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = prepare.resolve_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def barrier(world):
    if world > 1:
        dist.barrier()


def read_lines(path):
    """The JSON rows of a file; a line cut short by a crash is dropped."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


def read_parts(path):
    """Rows (dicts) of every part file of `path`."""
    return [row for part in sorted(path.parent.glob(path.name + ".part*")) for row in read_lines(part)]


def open_part(path, rank):
    """This rank's part file for appending, with a torn last line (a crash mid-write) removed first."""
    part = path.with_name(f"{path.name}.part{rank}")
    if part.exists():
        write_lines(part, read_lines(part))
    return open(part, "a", encoding="utf-8")


def write_lines(path, rows):
    """Atomic rewrite: one JSON object per line, written to a temporary name and renamed."""
    model.write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def merge_parts(path, world, finalize):
    """After every rank finished its part: rank 0 writes finalize(rows of all parts) to path (atomically) and removes
    the parts. Every rank returns once the file is there."""
    barrier(world)
    if int(os.environ.get("RANK", 0)) == 0:
        # (the first barrier: every part is complete; the second: no rank reads path before rank 0 has written it)
        write_lines(path, finalize(read_parts(path)))
        for part in path.parent.glob(path.name + ".part*"):
            part.unlink()
    barrier(world)


def prefetched(fn, items, workers):
    """(item, fn(item)) in order, fn running on a thread pool up to `workers` items ahead: image decoding and
    preprocessing (PIL and numpy release the GIL) overlap the model's work instead of sitting in front of it."""
    if workers <= 0:
        yield from ((item, fn(item)) for item in items)
        return
    with ThreadPoolExecutor(workers) as pool:
        # a bounded queue of futures: at most `workers` items decoded ahead, results handed out in input order
        queue = deque()
        for item in items:
            queue.append((item, pool.submit(fn, item)))
            if len(queue) > workers:
                it, fut = queue.popleft()
                yield it, fut.result()
        while queue:
            it, fut = queue.popleft()
            yield it, fut.result()


def encode_records(bundle, records):
    return sample.encode_prompts(bundle, [record_image(r) for r in records], [r["question"] for r in records])


# ---------------------------------------------------------------------------------------------------------------
# ---- the runs ----


def percentile_stats(xs):
    xs = np.asarray(xs, dtype=np.float64)
    if xs.size == 0:
        return {"mean": None, "p50": None, "p90": None}
    return {"mean": float(xs.mean()), "p50": float(np.percentile(xs, 50)), "p90": float(np.percentile(xs, 90))}


def compile_setting(opts):
    return {"auto": None, "yes": True, "no": False}[opts.compile]


def run_one(bundle, records, mode, n_latents, opts, out_dir, world=1, rank=0):
    """Generate and score every record under one (mode, N); writes predictions-<mode>-<N>.jsonl; -> summary (rank 0;
    None on the other ranks). A finished predictions file is read back instead of generated again."""
    path = Path(out_dir) / f"predictions-{mode}-{n_latents}.jsonl"
    # batches are the unit of work: a batch's rows and sampling seed are the same whichever rank runs it
    batches = [records[i:i + opts.batch_size] for i in range(0, len(records), opts.batch_size)]
    ids = [r["id"] for r in records]
    done = {p["id"]: p for p in read_lines(path)} if path.exists() else {}
    if set(done) != set(ids):
        # resume: every record found in any rank's part file (of this run or a crashed one) is not generated again
        done = {p["id"]: p for p in read_parts(path) if "id" in p}
        mine = [k for k in range(rank, len(batches), world) if not all(r["id"] in done for r in batches[k])]
        with open_part(path, rank) as f:
            units = prefetched(lambda k: encode_records(bundle, batches[k]), mine, opts.workers)
            for k, prompts in tqdm(units, total=len(mine), desc=f"{mode} N={n_latents}", leave=False,
                                   disable=rank != 0):
                batch = batches[k]
                if bundle.device.type == "cuda":
                    torch.cuda.synchronize(bundle.device)
                t0 = time.perf_counter()
                # seed: --seed + the batch's first record index, the same on any rank and in a resumed run
                rows = sample.generate(bundle, None, None, prompts=prompts, mode=mode,
                                       max_new_tokens=opts.max_new_tokens, temperature=opts.temperature,
                                       top_p=opts.top_p, n_latents=n_latents, ema_norm=opts.ema_norm,
                                       seed=opts.seed + k * opts.batch_size, compile=compile_setting(opts))
                dt = time.perf_counter() - t0   # generate ends in a .cpu() copy, so the device work is finished
                for rec, row in zip(batch, rows):
                    ok, got = score_record(rec, row["text"], opts.scoring, Path(opts.data).stem)
                    f.write(json.dumps({"id": rec["id"], "category": rec["category"], "answer": rec["answer"],
                                        "prediction": row["text"], "extracted": got, "correct": ok, "latency_s": dt,
                                        "latents_fed": sum(s["count"] for s in row["latent_spans"]),
                                        "n_generated": row["n_generated"], "latent_spans": row["latent_spans"]},
                                       ensure_ascii=False) + "\n")
                # flushed per batch: a crash loses at most the batch being generated, and a resume skips the rest
                f.flush()
        # a record found in two parts (a crashed run's and its resume's) is kept once; the output keeps the data's order
        merge_parts(path, world, lambda parts: [{p["id"]: p for p in parts}[i] for i in ids])
    if rank != 0:
        return None
    done = {p["id"]: p for p in read_lines(path)}
    preds = [done[i] for i in ids]
    cats, scored = {}, [p["correct"] for p in preds if p["correct"] is not None]   # None: a record without answer
    for p in preds:
        if p["correct"] is not None:
            cats.setdefault(p["category"], []).append(p["correct"])
    # every row of a batch carries the batch's wall time: count each batch once, the batches one after another
    total = sum(done[b[0]["id"]]["latency_s"] for b in batches)
    return {"mode": mode, "latents": n_latents, "n": len(preds), "n_scored": len(scored),
            "accuracy": float(np.mean(scored)) if scored else None,
            "per_category": {c: {"accuracy": float(np.mean(v)), "n": len(v)} for c, v in sorted(cats.items())},
            "latency_s": percentile_stats([p["latency_s"] for p in preds]),
            "mean_latents": float(np.mean([p["latents_fed"] for p in preds])),
            "mean_generated": float(np.mean([p["n_generated"] for p in preds])),
            "samples_per_s": len(preds) / total if total > 0 else None, "predictions": str(path)}


def format_table(rows, columns):
    """Plain aligned text: columns = [(header, key or callable, format)]."""
    cells = [[h for h, _, _ in columns]]
    for r in rows:
        cells.append([("-" if (v := (k(r) if callable(k) else r.get(k))) is None else fmt.format(v))
                      for _, k, fmt in columns])
    widths = [max(len(c[j]) for c in cells) for j in range(len(columns))]
    return "\n".join("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(line, widths)))
                     for line in cells)


def parse_list(s, cast, what):
    try:
        return [cast(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise prepare.DataError(f"--{what} {s!r}: expected a comma-separated list") from None


def evaluate(opts, bundle=None):
    """The intervention table (modes at the folder's N) and the budget sweep (N at the sweep mode). -> results
    (on rank 0; None on the other ranks of a torchrun)."""
    # ---- setup: processes, the model folder, the records, how answers are scored, which modes can run ----
    prepare.check_options(opts)
    rank, world, device = dist_setup(opts.device)
    bundle = bundle or sample.load(opts.model, prepare.resolve_dtype(opts.dtype, device), device, opts.min_pixels,
                                   opts.max_pixels)
    if rank == 0:
        prepare.print_pixels(bundle.pixels)
    records = read_data(opts.data, need_answer=False)
    records = records[:opts.limit] if opts.limit > 0 else records
    if not records:
        raise prepare.DataError(f"{opts.data}: no records")
    scoring, note = resolve_scoring(opts, records)
    opts = dataclasses.replace(opts, scoring=scoring)
    if rank == 0:
        if note:
            print(f"note: {note}", file=sys.stderr)
        print(f"scoring: {opts.scoring}; {sum(r['answer'] is not None for r in records)}/{len(records)} records have "
              f"an answer", file=sys.stderr)
    avail = sample.available_modes(bundle)
    if opts.modes == "auto":
        modes = [m for m in ("pca", "zero", "noise", "raw") if m in avail]
    else:
        modes = parse_list(opts.modes, str, "modes")
        for m in modes:
            sample.check_mode(bundle, m)          # refuse up front, with the reason, before hours of generation
    sweep = parse_list(opts.latents, int, "latents")
    sweep_mode = opts.sweep_mode if opts.sweep_mode != "auto" else (
        bundle.kind if bundle.kind in ("pca", "full") else "raw")
    if sweep:
        sample.check_mode(bundle, sweep_mode)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    # ---- the runs: untimed warm-up, the intervention table (every mode at the folder's N), the budget sweep ----
    # untimed warm-up on the first batch: allocator growth, kernel selection and, on CUDA, compiling the decode step
    # and capturing its CUDA graphs (the first cache-length bucket) are not charged to the first samples
    first = records[:opts.batch_size]
    sample.generate(bundle, None, None, prompts=encode_records(bundle, first), mode="zero",
                    max_new_tokens=opts.max_new_tokens if bundle.device.type == "cuda" else 2,
                    compile=compile_setting(opts))
    done = {}

    def run(mode, n):
        key = ("zero", 0) if mode == "zero" or n == 0 else (mode, n)   # N = 0 is the zero mode; no span to fill
        if key not in done:
            done[key] = run_one(bundle, records, key[0], key[1], opts, out, world, rank)
        return done[key]

    intervention = [run(m, bundle.n_latents) for m in tqdm(modes, desc="modes", disable=rank != 0)]
    budget = [{**(run(sweep_mode, n) or {}), "latents": n} for n in tqdm(sweep, desc="sweep", disable=rank != 0)]
    if rank != 0:
        return None
    # ---- results.json and the two tables ----
    results = {"model": str(opts.model), "data": str(opts.data), "n_records": len(records),
               "n_latents": bundle.n_latents, "ema_norm": opts.ema_norm, "intervention": intervention,
               "image_min_pixels": bundle.pixels[0], "image_max_pixels": bundle.pixels[1],
               "sweep_mode": sweep_mode if sweep else None, "sweep": budget}
    model.write_text_atomic(out / "results.json", json.dumps(results, indent=2) + "\n")
    print_tables(results)
    print(f"\nwrote {out / 'results.json'}")
    return results


def print_tables(results):
    """The intervention table (per category when there are several) and the budget sweep, from results.json."""
    intervention, budget = results["intervention"], results["sweep"]
    lat = lambda r: r["latency_s"]["mean"]
    print(f"\nintervention table ({results['n_records']} records, N={results['n_latents']}"
          f"{', ema-norm' if results['ema_norm'] else ''})")
    cats = sorted({c for r in intervention for c in r["per_category"]})
    per_cat = [(c, lambda r, c=c: r["per_category"].get(c, {}).get("accuracy", float("nan")), "{:.3f}")
               for c in cats] if len(cats) > 1 else []
    print(format_table(intervention, [("mode", "mode", "{}"), ("accuracy", "accuracy", "{:.4f}"), *per_cat,
                                      ("latency_s", lat, "{:.3f}"), ("p90_s", lambda r: r["latency_s"]["p90"], "{:.3f}"),
                                      ("latents/sample", "mean_latents", "{:.1f}")]))
    if budget:
        print(f"\nbudget sweep (mode {results['sweep_mode']}; 0 = zero)")
        print(format_table(budget, [("latents", "latents", "{}"), ("accuracy", "accuracy", "{:.4f}"),
                                    ("latency_s", lat, "{:.3f}"), ("latents/sample", "mean_latents", "{:.1f}")]))


# ---------------------------------------------------------------------------------------------------------------
# ---- layer-wise norm profile (Fig. 2) ----


def _stats(xs):
    x = torch.cat(xs).double() if xs else torch.zeros(0, dtype=torch.float64)
    if x.numel() == 0:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(x.mean()), "std": float(x.std(unbiased=False)), "n": int(x.numel())}


@torch.no_grad()
def norm_profile(bundle, records):
    """Teacher-forced over prompt + reference response (if the record has one; latent spans emptied): per layer,
    mean +- std of log ||x|| at text and image positions; out/in ratios; and the norm of what each feedback mode
    would feed back (read at <|latent_start|> positions, else at text positions) next to the query image's
    vision-embedding norm (Fig. 2b)."""
    m, dev = bundle.model, bundle.device
    L = m.cfg.text.num_hidden_layers
    logs = {"text": [[] for _ in range(L + 1)], "vision": [[] for _ in range(L + 1)]}
    norms = {"text": ([], []), "vision": ([], [])}       # (input embedding, last block output)
    fb = {k: [] for k in ("raw", bundle.kind if bundle.kind in ("pca", "full") else None, "vision") if k}
    for rec in tqdm(records, desc="norms"):
        pixel_values, grid = sample.preprocess(bundle, record_image(rec))
        n_img = int(grid.prod()) // m.cfg.vision.spatial_merge_size ** 2
        if rec.get("response"):
            ids, _ = prepare.build_example(bundle.tok, rec["question"], rec["response"], n_img, 0)
        else:
            ids = prepare.prompt_ids(bundle.tok, rec["question"], n_img)
        input_ids = torch.tensor([ids], device=dev)
        grid = grid.to(dev)
        # one record at a time, teacher-forced (no generation): every layer's output at every position is measured
        x = m.embed(input_ids, pixel_values.to(dev), grid)                     # (1, T, D)
        pos, _ = m.position_ids(input_ids, grid)
        h, layers = m.decode(x, pos, return_layers=True)                       # h̄ (1, T, D), L + 1 x (1, T, D)
        is_img = input_ids[0] == m.cfg.image_token_id
        where = {"text": ~is_img, "vision": is_img}
        for l, y in enumerate(layers):
            # log norms, so that the mean +- std band of Fig. 2a is symmetric over orders of magnitude
            n = y[0].float().norm(dim=-1)                                       # (T,)
            for k, sel in where.items():
                logs[k][l].append(n[sel].log().cpu())
        for k, sel in where.items():
            norms[k][0].append(layers[0][0][sel].float().norm(dim=-1).cpu())
            norms[k][1].append(layers[-1][0][sel].float().norm(dim=-1).cpu())
        # h̄ where a latent would be predicted: at each <|latent_start|> (the state that yields the first latent);
        # a record without spans falls back to all text positions
        at = input_ids[0] == bundle.ids["latent_start"]
        hb = h[0][at if bool(at.any()) else ~is_img]                            # (n, D)
        fb["raw"].append(hb.float().norm(dim=-1).cpu())
        if bundle.kind in ("pca", "full"):
            fb[bundle.kind].append(bundle.head(hb).norm(dim=-1).cpu())
        fb["vision"].append(x[0][is_img].float().norm(dim=-1).cpu())
    layer_rows = []
    for l in range(L + 1):
        layer_rows.append({"layer": l, "text": _stats(logs["text"][l]), "vision": _stats(logs["vision"][l])})
    embed = {k: _stats(v[0])["mean"] for k, v in norms.items()}
    last = {k: _stats(v[1])["mean"] for k, v in norms.items()}
    ratio = {k: (last[k] / embed[k]) if embed[k] else None for k in norms}  # paper (trained 7B): 546x text, 8.7x vision
    return {"model": bundle.path, "n_records": len(records), "n_layers": L + 1, "log_norm_layers": layer_rows,
            "embed_norm": embed, "last_layer_norm": last, "out_in_ratio": ratio,
            "feedback_norm": {k: _stats(v) for k, v in fb.items()}}


def plot_norms(prof, path):
    import matplotlib                                  # lazily: only this subcommand needs it
    matplotlib.use("Agg")                              # no display: write the PNG only
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    ls = [r["layer"] for r in prof["log_norm_layers"]]
    for k, c in (("text", "tab:blue"), ("vision", "tab:orange")):
        mu = np.array([r[k]["mean"] if r[k]["mean"] is not None else np.nan for r in prof["log_norm_layers"]])
        sd = np.array([r[k]["std"] if r[k]["std"] is not None else np.nan for r in prof["log_norm_layers"]])
        a.plot(ls, mu, color=c, label=f"{k} (x{prof['out_in_ratio'][k] or float('nan'):.1f} out/in)")
        a.fill_between(ls, mu - sd, mu + sd, color=c, alpha=0.2)
    a.set_xlabel("layer (0 = input embedding)"), a.set_ylabel("log L2 norm"), a.legend()
    a.set_title("hidden-state norm by layer")
    names = list(prof["feedback_norm"])
    means = [prof["feedback_norm"][k]["mean"] or 0.0 for k in names]
    stds = [prof["feedback_norm"][k]["std"] or 0.0 for k in names]
    b.bar(names, means, yerr=stds, color=["tab:gray" if k != "vision" else "tab:orange" for k in names])
    b.set_yscale("log")                                # raw h̄ can be ~100x the vision norm on a trained 7B
    b.set_ylabel("L2 norm"), b.set_title("what each mode feeds back vs vision embeddings")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def norms_main(opts, bundle=None):
    prepare.check_options(opts)
    device = prepare.resolve_device(opts.device)
    bundle = bundle or sample.load(opts.model, prepare.resolve_dtype(opts.dtype, device), device, opts.min_pixels,
                                   opts.max_pixels)
    prepare.print_pixels(bundle.pixels)
    records = read_data(opts.data, need_answer=False)[:max(opts.limit, 1)]
    prof = norm_profile(bundle, records)
    prof["data"] = str(opts.data)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    model.write_text_atomic(out / "norms.json", json.dumps(prof, indent=2) + "\n")
    plot_norms(prof, out / "norms.png")
    r = prof["out_in_ratio"]
    fmt = lambda v: "-" if v is None else f"{v:.1f}x"
    print(f"out/in norm ratio: text {fmt(r['text'])}, vision {fmt(r['vision'])} (paper, trained 7B: 546x, 8.7x)")
    print("fed-back norm: " + ", ".join(f"{k} {v['mean']:.3g}" for k, v in prof["feedback_norm"].items()
                                        if v["mean"] is not None))
    print(f"wrote {out / 'norms.json'} and {out / 'norms.png'}")
    return prof


# ---------------------------------------------------------------------------------------------------------------
# ---- difficulty scoring (prepare.py score) ----


def score_file(model_dir, data_file, samples=8, out_file=None, temperature=1.0, top_p=1.0, max_new_tokens=256,
               seed=0, device="auto", dtype="auto", bundle=None, pixels=(-1, -1), workers=4):
    """Difficulty scoring: sample the base model `samples` times per record (mode zero: a base model has no latent
    head; the prompt is prefilled once and its cache rows copied), grade each with score(), and write a copy of the
    JSONL with `accuracy` = mean correctness per record. Under torchrun records are split over ranks (see above).
    Resumable: records already in out_file (by id) or in a part file are kept; a torn last line is dropped.
    out_file is replaced at the end, so it may not be data_file nor hold records that data_file lacks."""
    data_file = Path(data_file)
    out_file = Path(out_file) if out_file else data_file.with_name(data_file.stem + ".scored.jsonl")
    if out_file.resolve() == data_file.resolve():
        raise prepare.data_error(out_file, "--out", "expected a file other than --data (it is rewritten while "
                                                    "scoring), found --data itself")
    records = read_jsonl(data_file)
    line_of = {r["id"]: i for i, r in enumerate(records)}
    scored = {}                                               # record index -> scored row
    # resume: read what an earlier (possibly crashed) run wrote; bytes, so that a cut UTF-8 character is one bad line
    if out_file.exists():
        for lineno, line in enumerate(out_file.read_bytes().split(b"\n"), 1):
            try:
                obj = json.loads(line)
            except ValueError:                                # JSON or UTF-8 error: the line a crash cut short,
                continue                                      # or a blank one; that record is scored again
            if isinstance(obj, dict) and str(obj.get("id")) not in line_of:
                raise prepare.data_error(out_file, "id", f"expected the ids of {data_file} (this file is resumed), "
                                                         f"found {obj.get('id')!r}, which it lacks", line=lineno)
            if isinstance(obj, dict) and obj.get("accuracy") is not None:
                scored[line_of[str(obj.get("id"))]] = obj
    scored.update({p["index"]: p["row"] for p in read_parts(out_file) if {"index", "row"} <= set(p)})
    rank, world, device = dist_setup(device)
    todo = [i for i in range(rank, len(records), world) if i not in scored]
    if todo and bundle is None:
        bundle = sample.load(model_dir, prepare.resolve_dtype(dtype, device), device, *pixels)
        if rank == 0:
            prepare.print_pixels(bundle.pixels)
    with open_part(out_file, rank) as f:
        units = prefetched(lambda i: encode_records(bundle, records[i:i + 1]), todo, workers)
        for i, prompts in tqdm(units, total=len(todo), desc="score", disable=rank != 0):
            r = records[i]
            # the seed follows the record's line, so a resumed run draws exactly what an uninterrupted one would
            rows = sample.generate(bundle, None, None, prompts=prompts, n_samples=samples, mode="zero",
                                   max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed + i)
            acc = float(np.mean([score(row["text"], r["answer"], r.get("choices"))[0] for row in rows]))
            f.write(json.dumps({"index": i, "row": {**r["raw"], "accuracy": acc}}, ensure_ascii=False) + "\n")
            f.flush()
    merge_parts(out_file, world, lambda parts: [
        row for _, row in sorted({**scored, **{p["index"]: p["row"] for p in parts}}.items())])
    return out_file


# ---------------------------------------------------------------------------------------------------------------
# ---- the oracle-latent probe ----
# Can the model *read* a latent span? Feed every span the true auxiliary-image embeddings (the targets prepare.py
# computed) under teacher forcing, and count a record as solved when every supervised token from the one that
# completes "<answer>" to the end (the answer, "</answer>", the stop token) is the argmax. feed="none" strips the
# spans from the same records: the same text before the answer, no visual evidence. Oracle well above none means
# hop 2 works on real latents, so any gap left between GAP's own latents and the oracle is hop 1 (producing them).


def oracle_probe(m, prepared, feed="oracle", limit=0, batch_size=32):
    """-> {"feed", "n", "accuracy", "hits"} over the prepared folder's records with latent spans."""
    import train   # lazy: train.py is the one place that reads prepared folders (records, targets, padding)
    if feed not in ("oracle", "none"):
        raise ValueError(f"oracle_probe: feed {feed!r}: expected oracle or none")
    keep = train.Records(prepared, tau=1.0)   # tau 1: nothing stripped, every span keeps its targets
    recs = train.Records(prepared, tau=1.0 if feed == "oracle" else -1.0)
    idx = [i for i in range(len(keep)) if keep.start_id in keep.raw(i)[0]]
    idx = idx[:limit] if limit > 0 else idx
    device, hits, tok = next(m.parameters()).device, [], prepare.load_tokenizer(prepared)
    for j in tqdm(range(0, len(idx), batch_size), desc=f"oracle probe ({feed})", leave=False):
        rows = idx[j:j + batch_size]
        # the tail: the shortest suffix of supervised tokens that decodes to text holding "<answer>" (the same
        # tokens with or without the spans: they all follow the last span)
        tails = []
        for i in rows:
            sup = [t for t in keep.raw(i)[1].tolist() if t != prepare.IGNORE]
            n = next((n for n in range(1, len(sup) + 1) if "<answer>" in tok.decode(sup[-n:])), len(sup))
            tails.append(n)
        b = train.collate([recs.get(i) for i in rows], m.cfg, recs.pad_id, recs.pixels)
        b = {k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}
        with torch.no_grad():
            x = m.embed(b["input_ids"], b["pixel_values"], b["image_grid_thw"])          # (B, T, D)
            pos, _ = m.position_ids(b["input_ids"], b["image_grid_thw"], b["attention_mask"])
            if b["targets"] is not None:   # teacher forcing: the input at latent pad j is target v_j
                lat = b["input_ids"] == recs.pad_id                                        # (B, T)
                x = x.masked_scatter(lat[..., None], b["targets"].to(x.dtype))
            pred = m.lm_head(m.decode(x, pos)[:, :-1]).argmax(-1)                          # (B, T-1) next token
        labels = b["labels"][:, 1:]
        for r, n_tail in enumerate(tails):
            sup = (labels[r] != prepare.IGNORE).nonzero().flatten()[-n_tail:]            # the tail's positions
            hits.append(bool((pred[r, sup] == labels[r, sup]).all()))
    return {"feed": feed, "n": len(hits), "accuracy": float(np.mean(hits)) if hits else None, "hits": hits}


def oracle_main(opts):
    device = prepare.resolve_device(opts.device)
    m = model.load_pretrained(opts.model, dtype=torch.float32, device=device)
    rows = [oracle_probe(m, opts.data, feed, opts.limit, opts.batch_size) for feed in ("oracle", "none")]
    print(format_table(rows, [("latents fed", "feed", "{}"), ("records", "n", "{}"),
                              ("tail accuracy", "accuracy", "{:.4f}")]))
    if opts.out:   # the layout evaluate() writes, so `eval.py summary` reads it beside the intervention tables
        mode, path = {"oracle": "true_latents", "none": "no_latents"}, Path(opts.out) / "results.json"
        res = {"model": opts.model, "data": opts.data, "intervention": [
            {"mode": mode[r["feed"]], "n": r["n"], "accuracy": r["accuracy"]} for r in rows]}
        path.parent.mkdir(parents=True, exist_ok=True)
        model.write_text_atomic(path, json.dumps(res, indent=2) + "\n")
        print(f"wrote {path}")
    return rows


# ---------------------------------------------------------------------------------------------------------------
# ---- CLI ----


def summary(folders, json_path=None):
    """Mean +- std (over seeds, ddof 0) of accuracy: eval folders named [eval-]<group>-<seed> (what `make demo`
    writes). json_path: also write {group: {mode: {"mean", "std", "seeds": {seed: accuracy}}}} there."""
    groups = {}
    for folder in folders:
        res = model.read_json(Path(folder) / "results.json")
        group, seed = Path(folder).name.rsplit("-", 1)
        for row in res["intervention"]:
            groups.setdefault((group, row["mode"]), {})[seed] = row["accuracy"]
    rows = [{"run": g, "mode": m, "seeds": len(a), "mean": float(np.mean(list(a.values()))),
             "std": float(np.std(list(a.values())))} for (g, m), a in groups.items()]
    print(format_table(rows, [("run", "run", "{}"), ("mode", "mode", "{}"), ("seeds", "seeds", "{}"),
                              ("accuracy", "mean", "{:.4f}"), ("+-", "std", "{:.4f}")]))
    if json_path:
        table = {}
        for r in rows:
            by_seed = groups[(r["run"], r["mode"])]
            table.setdefault(r["run"].removeprefix("eval-"), {})[r["mode"]] = {
                "mean": r["mean"], "std": r["std"], "seeds": by_seed}
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        model.write_text_atomic(Path(json_path), json.dumps(table, indent=2) + "\n")
        print(f"wrote {json_path}")
    return rows


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["summary"]:
        parser = prepare.Parser(prog="eval.py summary", description="accuracy mean +- std over seeds")
        parser.add_argument("folders", nargs="+", help="eval output folders named <group>-<seed>")
        parser.add_argument("--json", default=None, help="also write the table as JSON here (e.g. out/demo/summary.json)")
        a = parser.parse_args(argv[1:])
        return summary(a.folders, a.json)
    if argv[:1] == ["oracle"]:
        parser = prepare.Parser(prog="eval.py oracle", description="oracle-latent probe: teacher-forced tail "
                                "accuracy with the true aux-image latents vs. with the spans stripped")
        prepare.add_options(parser, OracleOptions)
        return oracle_main(OracleOptions(**vars(parser.parse_args(argv[1:]))))
    if argv[:1] == ["norms"]:
        parser = prepare.Parser(prog="eval.py norms", description="layer-wise norm profile (Fig. 2)")
        prepare.add_options(parser, NormsOptions)
        return norms_main(NormsOptions(**vars(parser.parse_args(argv[1:]))))
    parser = prepare.Parser(description=__doc__)
    prepare.add_options(parser, EvalOptions)
    return evaluate(EvalOptions(**vars(parser.parse_args(argv))))


if __name__ == "__main__":
    prepare.run_main(main)
    if dist.is_initialized():
        dist.destroy_process_group()
