"""Interleaved text / latent generation for GAP: batched, static KV cache, one decode step per position.

Text tokens come from the LM head. When a row emits <|latent_start|> it switches to latent mode for N steps: the
input at each step is the feedback vector computed from the final-normed hidden state h̄ at the previous position
(the state that produced <|latent_start|> gives the first latent), then <|latent_end|> is forced and text resumes.
Latents sit at ordinary sequential text positions for M-RoPE, as in training. Feedback modes:
    pca    GAP: v̂ = P_k F(h̄) + mu (Eq. 1), the trained PCA head
    full   the d -> d head (ablation "LH")
    raw    output-as-input: feed h̄ itself (Coconut-style baseline)
    zero   latent spans suppressed: <|latent_start|> is never sampled
    noise  c ~ N(0, diag(lambda_1..k)) reconstructed through the PCA basis
--ema-norm rescales every fed-back latent to a running mean norm seeded from the query image's vision embeddings
(latent_head.EMANorm, updated token by token with the latents fed).

    python sample.py --model out/gap --image cat.png --question "How many legs?"             # tiny, CPU
    python sample.py --model out/gap-7b --image geo.png --question "..." --mode raw --ema-norm --device cuda
    python sample.py --model Qwen2.5-VL-7B-Instruct --image cat.png --question "..." --mode zero --json

Library use: bundle = sample.load(DIR); rows = sample.generate(bundle, [img], ["question"], mode="pca").
Speed: prefill once per prompt, then one step per position for the whole batch (next_inputs + trunk_step, no host
sync); on CUDA the trunk step is compiled with CUDA graphs over power-of-two cache buckets (Trunk, compile=...).
"""
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

import latent_head
import model
import prepare

MODES = ("pca", "full", "raw", "zero", "noise")
DEFAULT_LATENTS = 36   # N for a plain HF checkpoint (no gap.json): 6x6, the paper's default
EARLY_EXIT_EVERY = 8   # check "all rows done" every 8 steps: one host sync per 8 steps instead of one per step

# ---------------------------------------------------------------------------------------------------------------
# ---- options (argparse is generated from the dataclass: one place for defaults and help) ----


@dataclass
class SampleOptions:
    model: str = field(metadata={"help": "train.py output folder (gap.json) or a plain HF checkpoint folder"})
    image: str = field(metadata={"help": "query image file"})
    question: str = field(metadata={"help": "the question about the image"})
    mode: str = field(default="auto", metadata={"help": "pca | full | raw | zero | noise; auto = the folder's head "
                                                        "(gap.json), zero for a plain checkpoint"})
    ema_norm: bool = field(default=False, metadata={"help": "rescale latents to the query image's mean vision norm"})
    latents: int = field(default=-1, metadata={"min": -1, "help": "N latents per span; -1 = gap.json's (36 without it)"})
    max_new_tokens: int = field(default=256, metadata={"min": 1, "help": "positions generated, latents included"})
    temperature: float = field(default=0.0, metadata={"min": 0, "help": "0 = greedy"})
    top_p: float = field(default=1.0, metadata={"above": 0, "max": 1, "help": "nucleus sampling mass"})
    seed: int = field(default=0, metadata={"help": "sampling and noise-latent seed"})
    device: str = prepare.device_option()
    dtype: str = prepare.dtype_option()
    min_pixels: int = field(default=-1, metadata={"help": "smart_resize min_pixels; -1 = gap.json's (the trained "
                                                          "resolution), else preprocessor_config.json's"})
    max_pixels: int = field(default=-1, metadata={"help": "smart_resize max_pixels; -1 = as for min_pixels"})
    json: bool = field(default=False, metadata={"help": "print the result dict as JSON"})


# ---------------------------------------------------------------------------------------------------------------
# ---- loading ----


@dataclass
class Bundle:
    """Everything generation needs, loaded once. `kind` is the trained head's kind per gap.json (None for a plain
    HF checkpoint); `head` is that head (fp32, see latent_head's precision policy); `basis` the PCA basis if any."""
    model: model.Qwen25VL
    tok: object                     # tokenizers.Tokenizer with the latent tokens
    ids: dict                       # prepare.token_ids: im_start, im_end, ..., latent_start/pad/end
    head: nn.Module = None
    basis: latent_head.PCABasis = None
    n_latents: int = DEFAULT_LATENTS
    kind: str = None
    vision_norm: float = None       # gap.json: mean norm of the training targets (informational)
    path: str = ""
    pixels: tuple = (model.DEFAULT_MIN_PIXELS, model.DEFAULT_MAX_PIXELS, "defaults")  # prepare.resolve_pixels
    trunks: dict = field(default_factory=dict)   # get_trunk: the eager / compiled decode step, built once

    @property
    def device(self):
        return self.model.lm_head.weight.device

    @property
    def dtype(self):
        return self.model.lm_head.weight.dtype


def load(model_dir, dtype=torch.float32, device="cpu", min_pixels=-1, max_pixels=-1):
    """A train.py output folder (gap.json + latent_head/pca safetensors) or a plain HF checkpoint (modes raw and
    zero only). Every inconsistency between gap.json, the tokenizer and the head files is an error naming the file.
    Image pixel limits: the arguments if > 0, else gap.json's, else preprocessor_config.json's (resolve_pixels)."""
    path = Path(model_dir)
    device = torch.device(device)
    m = model.load_pretrained(path, dtype=dtype, device=device)
    tok = prepare.load_tokenizer(path)
    ids = prepare.token_ids(tok)
    prepare.check_latent_ids(tok, m.cfg)
    bundle = Bundle(model=m, tok=tok, ids=ids, path=str(path),
                    pixels=prepare.resolve_pixels(path, min_pixels, max_pixels))
    gap_file = path / "gap.json"
    if not gap_file.exists():
        return bundle                            # plain checkpoint: no head, no basis, N from --latents
    if (path / "pca.safetensors").exists():
        bundle.basis = latent_head.PCABasis.load(path / "pca.safetensors", device=device)
    try:
        gap = json.loads(gap_file.read_text())
        kind, n = gap["latent_head"], int(gap["n_latents"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise prepare.DataError(f"{gap_file}: expected JSON with latent_head and n_latents "
                                f"({type(e).__name__}: {e})") from None
    if kind not in latent_head.KINDS:
        raise prepare.DataError(f"{gap_file}: latent_head {kind!r}, expected one of {latent_head.KINDS}")
    # the ids the model was trained with must be the ids this tokenizer produces, or every span is misread
    want = {k: gap.get("latent_ids", {}).get(k) for k in ("start", "pad", "end")}
    have = {"start": ids["latent_start"], "pad": ids["latent_pad"], "end": ids["latent_end"]}
    if gap.get("latent_ids") is not None and want != have:
        raise prepare.DataError(f"{gap_file}: latent_ids {want} differ from {path / 'tokenizer.json'}'s {have}")
    if kind == "raw":
        head = latent_head.RawFeedback()
    else:
        if kind == "pca" and bundle.basis is None:
            raise prepare.DataError(f"{gap_file}: latent_head 'pca' but {path / 'pca.safetensors'} is missing")
        head = latent_head.load_head(path / "latent_head.safetensors", basis=bundle.basis, kind=kind, device=device)
    bundle.head, bundle.kind, bundle.n_latents = head.float().eval(), kind, n
    bundle.vision_norm = gap.get("vision_norm")
    return bundle


def check_mode(bundle, mode):
    """Raise a ValueError saying why `mode` cannot run with what this folder holds."""
    if mode not in MODES:
        raise prepare.DataError(f"mode {mode!r}: expected one of {', '.join(MODES)}")
    where = bundle.path or "this model"
    if mode in ("pca", "full") and bundle.kind != mode:
        has = f"a {bundle.kind!r} head (gap.json)" if bundle.kind else "no gap.json, i.e. a plain HF checkpoint"
        raise prepare.DataError(f"{where}: mode {mode!r} needs a trained {mode} latent head (latent_head.safetensors "
                                f"of kind {mode!r} named by gap.json) but the folder has {has}; modes raw and zero "
                                f"work on any checkpoint")
    if mode == "noise" and bundle.basis is None:
        raise prepare.DataError(f"{where}: mode 'noise' samples PCA coefficients and needs pca.safetensors, which this "
                                f"folder lacks; modes raw and zero work on any checkpoint")


def available_modes(bundle):
    out = []
    for mode in MODES:
        try:
            check_mode(bundle, mode)
            out.append(mode)
        except ValueError:
            pass
    return out


# ---------------------------------------------------------------------------------------------------------------
# ---- the per-step pieces shared by the cached loop and the naive oracle ----


def encode_prompts(bundle, images, questions):
    """-> list of (input_ids list, pixel_values (N, 1176), image_grid_thw (1, 3)) per row."""
    if len(images) != len(questions):
        raise ValueError(f"{len(images)} images but {len(questions)} questions")
    merge = bundle.model.cfg.vision.spatial_merge_size
    out = []
    for img, q in zip(images, questions):
        pixel_values, grid = preprocess(bundle, img)
        n_image_tokens = int(grid.prod()) // merge ** 2
        out.append((prepare.prompt_ids(bundle.tok, q, n_image_tokens), pixel_values, grid))
    return out


def preprocess(bundle, image):
    """model.preprocess_image at the bundle's pixel limits and the model's patch/merge sizes."""
    v = bundle.model.cfg.vision
    return model.preprocess_image(image, bundle.pixels[0], bundle.pixels[1], v.patch_size, v.spatial_merge_size,
                                     v.temporal_patch_size)


def logit_bias(bundle, mode, device):
    """Additive (V,) bias applied to text-mode logits: -inf on tokens that must never be sampled.
    <|latent_pad|> and <|latent_end|> are only ever inserted by the loop (never supervised as free choices), the
    embedding rows past the tokenizer are padding (Qwen: 152064 rows for 151668 tokens), and mode zero forbids
    <|latent_start|>."""
    V = bundle.model.cfg.text.vocab_size
    bias = torch.zeros(V, device=device)
    bias[bundle.tok.get_vocab_size():] = float("-inf")
    bias[[bundle.ids["latent_pad"], bundle.ids["latent_end"]]] = float("-inf")
    if mode == "zero":
        bias[bundle.ids["latent_start"]] = float("-inf")
    return bias


def sample_tokens(logits, temperature, top_p, generator):
    """(B, V) fp32 logits -> (B,) ids. Greedy at temperature 0; otherwise softmax(logits / T), nucleus top_p,
    and the exponential-race trick (argmax p / q with q ~ Exp(1) is a draw from p) so nothing syncs with the host."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        p, idx = probs.sort(dim=-1, descending=True)
        drop = p.cumsum(-1) - p >= top_p           # keep the smallest prefix whose mass reaches top_p
        # zeroed, not renormalised: the argmax of p / q below is the same for p and any multiple of it
        probs = probs.scatter(-1, idx, p.masked_fill(drop, 0.0))
    q = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / q).argmax(-1)


def feedback(bundle, mode, h, ema, generator):
    """The latent fed back at the next position from h̄ (B, D) -> (B, D) fp32. Computed for every row at every step
    (rows in text mode discard it): a few small matmuls, cheaper than a data-dependent branch, and the noise draws
    then depend only on the step count, so the naive oracle reproduces them."""
    if mode == "noise":
        v = latent_head.noise_latents(bundle.basis, (h.shape[0],), generator=generator)
    elif mode == "raw":
        v = h.float()
    elif mode in ("pca", "full"):
        v = bundle.head(h)
    else:                                           # zero: never fed (no span ever opens); keep shapes uniform
        v = torch.zeros_like(h, dtype=torch.float32)
    return ema(v) if ema is not None else v


def image_ema(bundle, x, input_ids, n_samples=1):
    """--ema-norm: an EMANorm per row seeded with that row's query-image embedding norm (each prompt's mean repeated
    n_samples times when its cache rows are)."""
    return latent_head.EMANorm().seed(x, input_ids == bundle.model.cfg.image_token_id, repeat=n_samples)


# The per-row state machine behind every decode step. Each row is in one state; at each position it feeds one input.
#
#   state               the row feeds at this position               and moves to
#   ------------------  -------------------------------------------  --------------------------------------------------
#   text                the sampled token's embedding                latent (left = N) if the token is <|latent_start|>;
#                                                                    done if it is <|im_end|> or <|endoftext|>; else text
#   latent, left > 0    v = feedback(h̄), recorded as <|latent_pad|>  latent, left - 1
#   latent, left == 0   <|latent_end|>, forced                       text
#   done                <|endoftext|> (a harmless pad), valid False  done
#
# So a span is <|latent_start|> (sampled), N fed-back vectors, <|latent_end|> (forced): the same N + 2 positions the
# training data holds. The first latent is computed from h̄ at <|latent_start|> itself. With N = 0 the row goes
# straight from <|latent_start|> to <|latent_end|>. All of it is torch.where on (B,) tensors: rows switch
# independently and the step never reads a value back to the host.


class LoopState:
    """Per-row state of the text/latent state machine, all (B,) device tensors (no host sync to update it)."""

    def __init__(self, B, device):
        self.latent = torch.zeros(B, dtype=torch.bool, device=device)   # row is inside a latent span
        self.left = torch.zeros(B, dtype=torch.long, device=device)     # latents still to feed in the span
        self.done = torch.zeros(B, dtype=torch.bool, device=device)     # row emitted <|im_end|> / <|endoftext|>

    def step(self, bundle, logits, bias, n_latents, temperature, top_p, generator):
        """Decide what every row feeds at this position. Returns (token (B,), use_latent (B,), valid (B,)):
        use_latent rows feed v, the others the token's embedding; valid is False for rows finished before this step."""
        ids = bundle.ids
        # sampled for every row, even rows whose token is overridden below: one batched call, no branch on the host
        tok = sample_tokens(logits + bias, temperature, top_p, generator)
        use_latent = self.latent & (self.left > 0)
        close = self.latent & (self.left == 0)                           # span complete: force <|latent_end|>
        tok = torch.where(close, ids["latent_end"], tok)
        tok = torch.where(use_latent, ids["latent_pad"], tok)            # recorded id of a latent position
        valid = ~self.done                                               # rows still generating at this step
        tok = torch.where(valid, tok, ids["endoftext"])                  # finished rows feed pads harmlessly
        use_latent = use_latent & valid
        text = valid & ~self.latent                                      # rows whose token was sampled freely
        opened = text & (tok == ids["latent_start"])
        self.left = torch.where(use_latent, self.left - 1, torch.where(opened, n_latents, self.left))
        self.latent = (self.latent & ~close) | opened
        self.done = self.done | (text & ((tok == ids["im_end"]) | (tok == ids["endoftext"])))
        return tok, use_latent, valid


def finish_rows(bundle, toks, is_lat, norms, valid, hidden=None, latents=None):
    """Host-side assembly of the per-row dicts from the (B, M) step records."""
    ids, rows = bundle.ids, []
    # the call's only device -> host copies, after the loop: the decode steps themselves never wait on the host
    toks, is_lat, norms, valid = toks.cpu(), is_lat.cpu(), norms.float().cpu(), valid.cpu()
    for b in range(toks.shape[0]):
        n = int(valid[b].sum())                     # valid steps form a prefix: a row never un-finishes
        t, lat, nrm = toks[b, :n].tolist(), is_lat[b, :n].tolist(), norms[b, :n].tolist()
        spans, pieces, text_ids, span = [], [], [], None
        for tid, is_l, nv in zip(t, lat, nrm):
            if is_l:
                span = span or {"count": 0, "norm_sum": 0.0}
                span["count"] += 1
                span["norm_sum"] += nv
                continue
            # (<|latent_start|> itself never reaches the text: decode's skip_special_tokens would drop it anyway)
            if tid == ids["latent_start"]:
                span = {"count": 0, "norm_sum": 0.0}
            elif tid == ids["latent_end"] and span is not None:
                pieces.append(bundle.tok.decode(text_ids, skip_special_tokens=True))
                pieces.append(prepare.LATENT_PLACEHOLDER)
                spans.append(span)
                text_ids, span = [], None
            elif tid not in (ids["im_end"], ids["endoftext"]):
                text_ids.append(tid)
        if span is not None:                        # a span cut by the token limit still counts
            pieces.append(bundle.tok.decode(text_ids, skip_special_tokens=True))
            pieces.append(prepare.LATENT_PLACEHOLDER)
            spans.append(span)
            text_ids = []
        pieces.append(bundle.tok.decode(text_ids, skip_special_tokens=True))
        row = {"text": "".join(pieces), "token_ids": t, "n_generated": n,
               "latent_spans": [{"count": s["count"], "mean_norm": s["norm_sum"] / max(s["count"], 1)}
                                for s in spans]}
        if hidden is not None:
            row["hidden"] = hidden[b, :n].float().cpu()                  # h̄ that decided each step
            row["latents"] = latents[b, :n][is_lat[b, :n]].float().cpu()  # the vectors actually fed
        rows.append(row)
    return rows


def next_inputs(bundle, mode, state, h, logits, bias, n_latents, temperature, top_p, ema, gen):
    """THE generation step, shared by generate, the naive oracle and bench.py: from h̄ (B, D) and its logits (B, V)
    decide every row's next position -> (token (B,), use_latent (B,), valid (B,), v (B, D) fed-back latent, inp (B, D)
    the next input embedding: v for rows in a latent span, the token's embedding for the others)."""
    m = bundle.model
    v = feedback(bundle, mode, h, ema, gen)                                  # (B, D) fp32
    tok, use_latent, valid = state.step(bundle, logits, bias, n_latents, temperature, top_p, gen)
    if ema is not None:
        ema.update(v, use_latent)                                            # the running mean, token by token
    v = v.to(m.lm_head.weight.dtype)                                         # fed in the trunk dtype
    inp = torch.where(use_latent[:, None], v, m.model.embed_tokens(tok))     # (B, D)
    return tok, use_latent, valid, v, inp


def trunk_step(m, inp, pos, input_pos, cache_mask, kv_len):
    """One position for every row through the cached trunk: input embedding (B, D) at cache slot input_pos (1,) with
    M-RoPE positions (3, B, 1), reading the first kv_len cache slots -> h̄ (B, D), logits (B, V) in fp32."""
    h = m.decode(inp[:, None], pos, cache_mask, input_pos=input_pos, kv_len=kv_len)[:, 0]
    return h, m.lm_head(h).float()


def kv_bucket(n):
    """Cache lengths and per-step read lengths rounded up to a power of two (>= 256): a whole eval then allocates a
    few cache shapes and compiles / graph-captures a few step shapes, not one per prompt, and a step reads at most
    2x the slots it needs (at 7B, batch 1, 2k slots of K/V are 117 MB against 15 GB of weights)."""
    return max(256, 1 << (n - 1).bit_length())


class Trunk:
    """trunk_step, eager or compiled. On CUDA the compiled step is torch.compile(mode="reduce-overhead"): CUDA graphs
    replay the ~1.4k kernel launches of a 7B step (~7 ms of host time, above the 4.2 ms HBM bound) as one. kv_len is
    the only shape that changes within a call; torch.compile makes it symbolic after its second value, and a graph
    is captured per bucket. Anything failing in compilation (no Triton, no C compiler) falls back to eager once,
    with a one-line warning."""

    def __init__(self, m, compile):
        self.m, self.cuda = m, m.lm_head.weight.device.type == "cuda"
        self.fn = None
        if compile:
            backend = compile if isinstance(compile, str) else "inductor"
            mode = "reduce-overhead" if self.cuda and backend == "inductor" else None
            self.fn = torch.compile(trunk_step, backend=backend, mode=mode, fullgraph=True)

    @property
    def compiled(self):
        return self.fn is not None

    def __call__(self, *args):
        if self.fn is not None:
            try:
                if self.cuda:
                    torch.compiler.cudagraph_mark_step_begin()   # the previous step's outputs are consumed
                return self.fn(self.m, *args)
            except Exception as e:   # compile-time failures of any kind: the eager step computes the same thing
                print(f"warning: compiled decode step failed, running eagerly ({type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''})", file=sys.stderr)
                self.fn = None
        return trunk_step(self.m, *args)


def release_cache(bundle):
    """Free the KV cache after a call, unless a compiled step exists: its CUDA graphs hold the buffers' addresses,
    and setup_cache hands the same buffers to the next call of the same shape (eager calls included)."""
    if not any(t.compiled for t in bundle.trunks.values()):
        bundle.model.clear_cache()


def get_trunk(bundle, compile=None):
    """The bundle's decode step, built once per setting. compile: None = on CUDA only, False, True (inductor), or a
    torch.compile backend name (tests use "eager" / "aot_eager" to check graph capture without a C compiler)."""
    if compile is None:
        compile = bundle.device.type == "cuda"
    key = compile if isinstance(compile, str) else bool(compile)
    if key not in bundle.trunks:
        bundle.trunks[key] = Trunk(bundle.model, compile)
    return bundle.trunks[key]


# ---------------------------------------------------------------------------------------------------------------
# ---- generation ----


def prefill(bundle, rows, n_samples, max_new_tokens, ema_norm):
    """The prompts through the trunk once, left-padded so every row's last prompt token sits at slot T0 - 1 and the
    decode steps write the same slot for all rows. Allocates the KV cache generate decodes into (released by its
    caller), n_samples cache rows per prompt. Returns h̄ (B, D) at the last slot, its logits (B, V) in fp32, the
    cache mask (B, S), rope_deltas (B,), the per-row EMANorm (or None) and T0."""
    m, dev, n, Bu = bundle.model, bundle.device, n_samples, len(rows)
    T0 = max(len(r[0]) for r in rows)
    input_ids = torch.full((Bu, T0), bundle.ids["endoftext"], dtype=torch.long)
    mask = torch.zeros(Bu, T0, dtype=torch.long)
    for b, (p, _, _) in enumerate(rows):
        input_ids[b, T0 - len(p):] = torch.tensor(p)
        mask[b, T0 - len(p):] = 1
    input_ids, mask = input_ids.to(dev), mask.to(dev)
    pixel_values = torch.cat([r[1] for r in rows]).to(dev)
    grid = torch.cat([r[2] for r in rows]).to(dev)
    x = m.embed(input_ids, pixel_values, grid)                                  # (Bu, T0, D)
    pos, rope_deltas = m.position_ids(input_ids, grid, mask)                    # (3, Bu, T0), (Bu,)
    ema = image_ema(bundle, x, input_ids, n) if ema_norm else None
    S = kv_bucket(T0 + max_new_tokens)                                          # every slot we can ever write
    m.setup_cache(Bu * n, S, device=dev)
    # later slots are real for every row (finished rows write harmless pads); causality hides future slots
    cache_mask = torch.cat([mask, torch.ones(Bu, S - T0, dtype=mask.dtype, device=dev)], dim=1)  # (Bu, S)
    h = m.decode(x, pos, cache_mask, input_pos=torch.arange(T0, device=dev))[:, -1]   # (Bu, D) h̄ at the last slot
    if n > 1:                                       # prompt b's cache rows -> rows b*n .. b*n + n - 1
        m.spread_cache(n, T0)
        h, cache_mask, rope_deltas = (t.repeat_interleave(n, dim=0) for t in (h, cache_mask, rope_deltas))
    return h, m.lm_head(h).float(), cache_mask, rope_deltas, ema, T0            # logits (B, V)


@torch.no_grad()
def generate(bundle, images, questions, mode="pca", max_new_tokens=256, temperature=0.0, top_p=1.0, n_latents=None,
             ema_norm=False, seed=0, debug=False, n_samples=1, prompts=None, compile=None):
    """Batched generation. images: PIL images or paths; questions: strings (or prompts: encode_prompts' output,
    prepared ahead, e.g. on a thread pool, with images and questions None). n_samples > 1 prefills each prompt once
    and copies its cache rows: the result then holds n_samples rows per prompt, prompt-major. compile: see get_trunk.
    Returns one dict per row: {"text" (spans as "<latent>"), "token_ids" (latent positions as <|latent_pad|>),
    "latent_spans": [{"count", "mean_norm"}], "n_generated" (positions, latents included)}; debug=True adds "hidden"
    and "latents" tensors."""
    check_mode(bundle, mode)
    dev = bundle.device
    N = bundle.n_latents if n_latents is None else int(n_latents)
    if N < 0 or max_new_tokens < 1 or n_samples < 1 or not (temperature >= 0 and 0 < top_p <= 1):
        raise ValueError(f"n_latents must be >= 0, max_new_tokens and n_samples >= 1, temperature >= 0 and 0 < top_p "
                         f"<= 1 (got {N}, {max_new_tokens}, {n_samples}, {temperature}, {top_p})")
    gen = torch.Generator(device=dev).manual_seed(seed)
    rows = prompts if prompts is not None else encode_prompts(bundle, images, questions)
    trunk = get_trunk(bundle, compile)
    try:
        h, logits, cache_mask, rope_deltas, ema, T0 = prefill(bundle, rows, n_samples, max_new_tokens, ema_norm)
        B, S = h.shape[0], cache_mask.shape[1]

        # ---- decode: one position per row per step, text and latent rows in the same step ----
        state, bias = LoopState(B, dev), logit_bias(bundle, mode, dev)
        toks = torch.zeros(B, max_new_tokens, dtype=torch.long, device=dev)
        is_lat = torch.zeros(B, max_new_tokens, dtype=torch.bool, device=dev)
        valid = torch.zeros(B, max_new_tokens, dtype=torch.bool, device=dev)
        norms = torch.zeros(B, max_new_tokens, device=dev)
        hidden = torch.zeros(B, max_new_tokens, h.shape[-1], device=dev) if debug else None
        lat_out = torch.zeros(B, max_new_tokens, h.shape[-1], device=dev) if debug else None
        slots = torch.arange(S, device=dev)                                     # cache slot of each step's input
        for i in range(max_new_tokens):
            tok, use_latent, ok, v, inp = next_inputs(bundle, mode, state, h, logits, bias, N, temperature, top_p,
                                                      ema, gen)
            toks[:, i], is_lat[:, i], valid[:, i] = tok, use_latent, ok
            norms[:, i] = v.float().norm(dim=-1)
            if debug:
                hidden[:, i], lat_out[:, i] = h.float(), v.float()
            if i == max_new_tokens - 1:
                break                                                           # the last choice needs no forward
            if i % EARLY_EXIT_EVERY == EARLY_EXIT_EVERY - 1 and bool(state.done.all()):
                break
            s = T0 + i                                                          # this input's cache slot
            step_pos = (s + rope_deltas).view(1, B, 1).expand(3, B, 1)          # (3, B, 1) text position on all axes
            # a compiled step reads a bucketed prefix (few shapes); eager reads exactly the slots written so far
            kv_len = kv_bucket(s + 1) if trunk.compiled else s + 1
            h, logits = trunk(inp, step_pos, slots[s:s + 1], cache_mask, kv_len)   # (B, D), (B, V)
    finally:
        release_cache(bundle)
    return finish_rows(bundle, toks, is_lat, norms, valid, hidden, lat_out)


@torch.no_grad()
def generate_naive(bundle, image, question, mode="pca", max_new_tokens=256, temperature=0.0, top_p=1.0,
                   n_latents=None, ema_norm=False, seed=0, debug=False):
    """The oracle: one row, no cache, the whole sequence of input embeddings re-run through the trunk each step,
    with the same generation step (next_inputs). Returns the same dict as generate() for that row."""
    check_mode(bundle, mode)
    m, dev = bundle.model, bundle.device
    N = bundle.n_latents if n_latents is None else int(n_latents)
    gen = torch.Generator(device=dev).manual_seed(seed)
    (p, pixel_values, grid), = encode_prompts(bundle, [image], [question])
    input_ids = torch.tensor([p], device=dev)
    grid = grid.to(dev)
    x = m.embed(input_ids, pixel_values.to(dev), grid)                          # (1, T0, D)
    pos, rope_deltas = m.position_ids(input_ids, grid)
    ema = image_ema(bundle, x, input_ids) if ema_norm else None
    state, bias, T0 = LoopState(1, dev), logit_bias(bundle, mode, dev), len(p)
    toks, is_lat, valid, norms, hidden, lat_out = [], [], [], [], [], []
    for i in range(max_new_tokens):
        h = m.decode(x, pos)[:, -1]                                             # (1, D) recomputed from scratch
        tok, use_latent, ok, v, inp = next_inputs(bundle, mode, state, h, m.lm_head(h).float(), bias, N,
                                                  temperature, top_p, ema, gen)
        toks.append(tok), is_lat.append(use_latent), valid.append(ok), norms.append(v.float().norm(dim=-1))
        hidden.append(h.float()), lat_out.append(v.float())
        if bool(state.done[0]) or i == max_new_tokens - 1:
            break
        x = torch.cat([x, inp[:, None]], dim=1)                                 # (1, T + 1, D)
        nxt = (T0 + i + rope_deltas).view(1, 1, 1).expand(3, 1, 1)
        pos = torch.cat([pos, nxt], dim=2)                                      # (3, 1, T + 1)
    st = lambda xs: torch.stack(xs, dim=1)                                      # list of (1, ...) -> (1, M, ...)
    return finish_rows(bundle, st(toks), st(is_lat), st(norms), st(valid),
                       st(hidden) if debug else None, st(lat_out) if debug else None)[0]


@torch.no_grad()
def rollout_latents(m, head, x, pos, lat, sync_calls=False):
    """Training's output-as-input (VaLR, whose data has no latent targets): the latents generation would feed at the
    latent positions lat (B, T) of a teacher-forced sequence x (B, T, D) with positions pos (3, B, T). The text stays
    as given; the latent at t is head(h̄_{t-1}), h̄ computed with every earlier latent already fed back, exactly as
    generate() does. The sequence goes through the KV cache in chunks split at each latent position, so latent t sees
    latent t-1's input: one chunk per latent column (K per block: 17 decode calls for a K = 16 block), not a full
    forward per latent. No grad flows through the fed-back values (like scheduled sampling's detached predictions);
    the pass that trains then reads them as inputs. -> (n_lat, D) fp32 in row-major order.

    sync_calls: under FSDP every forward all-gathers each layer's weights, so all ranks must make the same number of
    decode calls: the count is all-reduced (max) and the ranks with fewer latent columns pad with throw-away calls."""
    B, T, _ = x.shape
    x = x.clone()
    cols = lat.any(0).nonzero().flatten().tolist()                              # latent positions in any row
    n_calls = len(cols) + 1 if cols else 0                                      # chunks: the prefix, then one per column
    if sync_calls:
        most = torch.tensor(n_calls, device=x.device)
        torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
        for _ in range(int(most) - n_calls):                                    # outputs unused: only the collectives
            m.decode(x[:, :1], pos[:, :, :1])
    if not cols:
        return x.new_zeros(0, x.shape[-1], dtype=torch.float32)
    # under autocast the trunk writes bf16 keys/values: the cache must hold that dtype, not the fp32 weights'
    amp = torch.is_autocast_enabled(x.device.type)
    m.setup_cache(B, T, dtype=torch.get_autocast_dtype(x.device.type) if amp else x.dtype, device=x.device)
    try:
        h_prev, bounds = None, [0] + cols + [cols[-1] + 1]                      # nothing after the last latent
        for a, b in zip(bounds[:-1], bounds[1:]):
            if h_prev is not None:                                              # a is a latent position in some row
                x[:, a] = torch.where(lat[:, a, None], head(h_prev).to(x.dtype), x[:, a])
            h = m.decode(x[:, a:b], pos[:, :, a:b], input_pos=torch.arange(a, b, device=x.device))   # (B, b-a, D)
            h_prev = h[:, -1]
    finally:
        m.clear_cache()
    return x[lat].float()


# ---------------------------------------------------------------------------------------------------------------
# ---- CLI ----


def render(row, compact=True):
    """The response with each latent span shown as <latent x36 |v|=12.3>."""
    parts = row["text"].split(prepare.LATENT_PLACEHOLDER)
    if len(parts) != len(row["latent_spans"]) + 1:                # the model wrote "<latent>" itself: show raw spans
        return row["text"] + "".join(f" <latent x{s['count']} |v|={s['mean_norm']:.3g}>" for s in row["latent_spans"])
    out = parts[0]
    for s, part in zip(row["latent_spans"], parts[1:]):
        out += (f"<latent x{s['count']} |v|={s['mean_norm']:.3g}>" if compact else prepare.LATENT_PLACEHOLDER) + part
    return out


def main(argv=None):
    parser = prepare.Parser(description=__doc__.split("\n\n")[0])
    prepare.add_options(parser, SampleOptions)
    opts = SampleOptions(**vars(parser.parse_args(argv)))
    device = prepare.resolve_device(opts.device)
    bundle = load(opts.model, prepare.resolve_dtype(opts.dtype, device), device, opts.min_pixels, opts.max_pixels)
    prepare.print_pixels(bundle.pixels)
    mode = opts.mode if opts.mode != "auto" else (bundle.kind or "zero")
    t0 = time.perf_counter()
    row = generate(bundle, [opts.image], [opts.question], mode=mode, max_new_tokens=opts.max_new_tokens,
                   temperature=opts.temperature, top_p=opts.top_p, n_latents=None if opts.latents < 0 else opts.latents,
                   ema_norm=opts.ema_norm, seed=opts.seed)[0]
    dt = time.perf_counter() - t0
    if opts.json:
        print(json.dumps({**row, "mode": mode, "seconds": dt}, indent=2))
    else:
        print(render(row))
        n_lat = sum(s["count"] for s in row["latent_spans"])
        print(f"[{mode}: {row['n_generated']} positions, {n_lat} latents in {len(row['latent_spans'])} spans, "
              f"{dt:.2f}s]", file=sys.stderr)


if __name__ == "__main__":
    prepare.run_main(main)
