"""Speed of our Qwen2.5-VL against transformers on the same random weights, inputs and process: prefill, the text
decode step, the GAP latent step and end-to-end generation, each with the static KV cache. Ratios are transformers /
ours (> 1 means we are faster); on CUDA also the HBM lower bound of a decode step and the fraction of it we reach.

    .venv/bin/python bench.py --config tiny --iters 3                 # seconds, CPU
    .venv/bin/python bench.py --config small --threads 1 --cpu-time   # the CPU preset, steady on a shared machine
    python bench.py --config 7b --device cuda --compile               # bf16 on one GPU, plus the compiled step
    python bench.py --config 7b --device cuda --compile --batch 32 --image-size 1008 --no-hf   # 1296 image tokens

How each number is taken: an untimed warm-up, then --iters rounds with ours and HF interleaved (order reversed
every other round), torch.cuda.synchronize around every clock read, the median reported. Our steps are sample.py's
own (next_inputs + trunk_step): what generate() runs, not a copy of it.
  forward   ours m(ids, image) vs HF model(..., use_cache=False): the whole prompt, vision tower + logits for all T
  prefill   time to first token into a cache: ours setup_cache + position_ids + embed + decode(input_pos) + last
            logits + the first step's choice; HF generate() up to its first logits-processor call
  decode    per token, greedy: ours one generation step per token (sampling state machine -> input embedding ->
            trunk -> lm_head, no host sync); HF generate(min=max=n new tokens, its default cache), timed between
            logits-processor calls, i.e. (t_n - t_1) / (n - 1) with prefill excluded exactly
  latent    ours only: every row inside a latent span, v = PCAHead(h) fed back as the next input embedding
  generate  end to end, tokens/s over the batch: ours sample.generate (prompts preprocessed) vs HF generate, eager
            and (with --compile, where transformers supports it) with its static cache, which it compiles on CUDA
  train     (--train) one optimizer step on one micro-batch, the text after the image supervised: ours is train.py's
            GAP loss (supervised-only chunked LM loss) + backward + AdamW; on CPU in fp32 against transformers' model
            (loss from labels) + backward + AdamW on the same weights; on CUDA train.py's FSDP2 precision on a
            1-GPU process group, eager / activation checkpointing / compiled, with MFU and peak memory, then the
            full-depth model on --gpus GPUs extrapolated from --layers and --layers / 2

    .venv/bin/python bench.py --train --config small --threads 1 --cpu-time --iters 3        # CPU, vs transformers
    python bench.py --train --config 7b --layers 4 --device cuda --prompt-len 3840 --compile  # T = 4096 on a GPU
"""

import dataclasses
import gc
import statistics
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

import model
import prepare
import sample

# ---- options ----


@dataclass
class Options:
    config: str = field(default="small", metadata={"help": "model preset", "choices": list(model.PRESETS)})
    device: str = field(default="cpu", metadata={"help": "cpu | cuda | cuda:1 ..."})
    dtype: str = field(default="auto", metadata={"help": "auto = bfloat16 on cuda, float32 on cpu",
                                                 "choices": ["auto", "float32", "bfloat16"]})
    batch: int = field(default=1, metadata={"min": 1, "help": "rows per call (the same prompt in every row)"})
    prompt_len: int = field(default=64, metadata={"min": 1, "help": "text tokens around the image"})
    image_size: int = field(default=448,
                            metadata={"min": 28, "help": "side of the random square image (448 -> 256 tokens)"})
    decode_steps: int = field(default=32, metadata={"min": 2, "help": "new tokens per greedy run (>= 2)"})
    iters: int = field(default=5, metadata={"min": 1, "help": "timed repetitions; the median is reported"})
    hf: bool = field(default=True, metadata={"help": "also run transformers (--no-hf: ours only)"})
    compile: bool = field(default=False, metadata={"help": "also time the compiled decode step (CUDA graphs on "
                                                           "CUDA) and HF's static-cache generate"})
    hbm_gbs: float = field(default=0.0,
                           metadata={"min": 0, "help": "peak memory bandwidth in GB/s (auto for H100 SXM/H200)"})
    seed: int = field(default=0, metadata={"help": "weights, image and prompt seed"})
    threads: int = field(default=0,
                         metadata={"min": 0, "help": "CPU threads (0 = torch's default); 1 on a shared machine"})
    cpu_time: bool = field(default=False, metadata={"help": "time by process CPU time (needs --threads 1)"})
    train: bool = field(default=False, metadata={"help": "time one training step instead (forward + backward + AdamW, "
                                                         "train.py's loss and precision)"})
    layers: int = field(default=0, metadata={"min": 0, "help": "cut the decoder to L layers (0: the preset's depth); "
                                                               "a 7b-width model with a few layers fits one GPU"})
    gpus: int = field(default=8, metadata={"min": 1, "help": "--train on CUDA: extrapolate to the full depth with "
                                                             "--fsdp on this many GPUs"})


def parse_args(argv=None):
    p = prepare.Parser(description="Prefill / decode / latent-step speed, ours vs transformers.")
    prepare.add_options(p, Options)   # the one option generator every gap script uses
    return Options(**vars(p.parse_args(argv)))


# ---- helpers ----


@torch.no_grad()
def init_weights_(m, std=0.02, seed=0):
    """Norm weights 1, every other tensor N(0, std): HF's own init, so both models compute the same thing."""
    g = torch.Generator(device=m.lm_head.weight.device).manual_seed(seed)
    for name, p in m.named_parameters():
        if p.ndim == 1 and ("norm" in name or "ln_q" in name):
            p.fill_(1.0)
        else:
            p.normal_(0.0, std, generator=g)


def build_ours(cfg, dtype, device, seed):
    # on `meta` first, then allocated once in the final dtype/device: a 7B is never materialised in fp32
    with torch.device("meta"):
        m = model.Qwen25VL(cfg)
    m = m.to(dtype).to_empty(device=device)
    if cfg.tie_word_embeddings:
        m.lm_head.weight = m.model.embed_tokens.weight    # to_empty gives each module its own tensor: re-tie
    init_weights_(m, seed=seed)
    return m.eval()


def make_inputs(cfg, opts, device):
    """A random image + text prompt: text, <|vision_start|>, N <|image_pad|>, <|vision_end|>, text; --batch rows."""
    rng = np.random.default_rng(opts.seed)
    img = Image.fromarray(rng.integers(0, 256, (opts.image_size, opts.image_size, 3), dtype=np.uint8))
    pv, grid = model.preprocess_image(img)
    # one 14x14 patch per grid cell, 2x2 patches merged into one LLM token: 448 px -> 32 x 32 patches -> 256 tokens
    n_img = int(grid.prod()) // cfg.vision.spatial_merge_size ** 2
    text = torch.from_numpy(rng.integers(0, cfg.bos_token_id, opts.prompt_len))   # plain BPE ids, below specials
    # a quarter of the text before the image, the rest after: a chat preamble, the image, then the question
    a = opts.prompt_len // 4
    ids = torch.cat([text[:a], torch.tensor([cfg.vision_start_token_id] + [cfg.image_token_id] * n_img +
                                            [cfg.vision_end_token_id]), text[a:]])[None]    # (1, T)
    B = opts.batch
    return ids.expand(B, -1).to(device), pv.repeat(B, 1).to(device), grid.repeat(B, 1).to(device), n_img


def random_basis(d, k, seed):
    """A random PCABasis with k orthonormal directions and descending eigenvalues (speed does not care which)."""
    from latent_head import PCABasis
    g = torch.Generator().manual_seed(seed)
    P_k = torch.linalg.qr(torch.randn(d, k, generator=g))[0]                  # (d, k) orthonormal columns
    lam = torch.sort(torch.rand(d, generator=g), descending=True)[0]
    return PCABasis(P_k, torch.randn(d, generator=g), lam)


class Clock:
    """Seconds now; CUDA work is synchronised first. cpu=True reads process CPU time instead of wall time: with one
    thread it leaves out the time a neighbour holds the core, the steadier measure on a shared machine."""

    def __init__(self, device, cpu=False):
        self.device, self.read = device, time.process_time if cpu else time.perf_counter

    def __call__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return self.read()


def med(xs):
    return statistics.median(xs) * 1e3          # ms


def spread(xs):
    # half the min-max range as a percentage of the median: the honest noise figure on a shared machine
    return 50.0 * (max(xs) - min(xs)) / statistics.median(xs) if len(xs) > 1 else 0.0


def peak_bandwidth(opts, device):
    # the datasheet HBM bandwidth in bytes/s, for "of bound"; other GPUs: pass --hbm-gbs
    if opts.hbm_gbs > 0:
        return opts.hbm_gbs * 1e9
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if "H200" in name:
        return 4.8e12
    if "H100" in name and "PCIe" not in name:
        return 3.35e12                           # H100 SXM (HBM3)
    return None


# ---- our generation path: sample.py's step on a bundle of random weights ----


class NoText:
    """generate() asks a tokenizer only for its size (logit_bias) and for text (finish_rows); bench reads no text."""

    def __init__(self, size):
        self.size = size

    def get_vocab_size(self):
        return self.size

    def decode(self, ids, skip_special_tokens=True):
        return ""


def bench_bundle(m, head, basis):
    cfg = m.cfg
    first = cfg.bos_token_id + 22        # Qwen's layout: 22 special tokens after the BPE ids, then the latent tokens
    ids = {"im_end": cfg.eos_token_id, "endoftext": cfg.bos_token_id,
           "latent_start": first, "latent_pad": first + 1, "latent_end": first + 2}
    return sample.Bundle(model=m, tok=NoText(first + 3), ids=ids, head=head, basis=basis, kind="pca")


def ours_generate(bundle, ids, pv, grid, n, clk, trunk, latent=False):
    """Prefill into the static cache, then n - 1 generation steps. -> (ttft s, s per step, tokens (B, n)).
    latent=True puts every row inside a latent span first, so each step feeds back the PCA head's v."""
    m, (B, T), dev = bundle.model, ids.shape, ids.device
    mode = "pca" if latent else "zero"
    t0 = clk()
    # the prefill clock includes allocating the cache: HF's generate allocates its own inside its time to first token
    S = sample.kv_bucket(T + n)
    m.setup_cache(B, S)
    pos, delta = m.position_ids(ids, grid)
    h = m.decode(m.embed(ids, pv, grid), pos, input_pos=torch.arange(T, device=dev))[:, -1]   # (B, D)
    state, bias = sample.LoopState(B, dev), sample.logit_bias(bundle, mode, dev)
    if latent:   # inside a span longer than the run: every timed step feeds back the head's latent
        state.latent[:], state.left[:] = True, n + 1
    step = lambda h, logits: sample.next_inputs(bundle, mode, state, h, logits, bias, n + 1, 0.0, 1.0, None, None)
    # the first token's choice counts toward time to first token (HF's clock stops at its first logits-processor
    # call, just before its own choice)
    tok, _, _, _, inp = step(h, m.lm_head(h).float())
    toks = [tok]
    t1 = clk()
    slots = torch.arange(S, device=dev)
    # n - 1 forwards: token n is chosen from the logits of forward n - 1, the same count as HF's (t_n - t_1) / (n - 1)
    for i in range(n - 1):
        s = T + i
        # a generated token is text: its M-RoPE position is slot + rope_delta on all three axes, as in sample.generate
        p = (s + delta).view(1, B, 1).expand(3, B, 1)                         # (3, B, 1)
        h, logits = trunk(inp, p, slots[s:s + 1], None, sample.kv_bucket(s + 1) if trunk.compiled else s + 1)
        tok, _, _, _, inp = step(h, logits)
        toks.append(tok)
    t2 = clk()
    sample.release_cache(bundle)
    return t1 - t0, (t2 - t1) / (n - 1), torch.stack(toks, 1)


def hf_generate(hf, ids, pv, grid, n, cfg, clk, bias, static=False):
    """HF greedy generate with a logits processor that stamps the clock once per new token and adds our generate's
    logit bias (padding rows and latent tokens never sampled), so both pick among the same tokens.
    static=True: its static cache, which transformers compiles on CUDA. -> (ttft s, s per step, tokens, total s)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class Stamp(LogitsProcessor):
        def __init__(self):
            self.t = []

        def __call__(self, input_ids, scores):
            self.t.append(clk())                # HF syncs every step anyway (its stopping criteria)
            return scores + bias

    stamp = Stamp()
    hf.model.rope_deltas = None                 # HF keeps M-RoPE state between calls: start clean
    t0 = clk()
    # pad_token_id given: without it HF warns and falls back to the eos id on every call
    out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pv, image_grid_thw=grid,
                      mm_token_type_ids=(ids == cfg.image_token_id).long(), max_new_tokens=n, min_new_tokens=n,
                      do_sample=False, pad_token_id=cfg.eos_token_id, logits_processor=LogitsProcessorList([stamp]),
                      **({"cache_implementation": "static"} if static else {}))
    t2 = clk()
    t = stamp.t
    # t[0] stamps the prefill's logits, t[-1] the last step's: n stamps bracket n - 1 decode forwards
    return t[0] - t0, (t[-1] - t[0]) / (n - 1), out[:, ids.shape[1]:], t2 - t0


# ---- the benchmark ----


@torch.no_grad()
def setup(opts):
    """Options that cannot work together are refused before anything is built. -> (device, dtype)."""
    prepare.check_options(opts)
    device = prepare.resolve_device(opts.device)
    if opts.config in ("3b", "7b") and device.type != "cuda":
        raise prepare.DataError(f"--config: expected --device cuda with {opts.config} (a {opts.config} decode on CPU "
                                f"says nothing), found --device {opts.device}")
    if opts.cpu_time and (device.type == "cuda" or opts.threads != 1):
        raise prepare.DataError("--cpu-time: expected --device cpu --threads 1 (it measures one CPU thread), found "
                                f"--device {opts.device} --threads {opts.threads}")
    if opts.threads:
        # on a shared 2-core box, 2 OpenMP threads stall whenever a neighbour holds one core (a 4x1x16 @ 4x16x338
        # bmm went from 3 us to 0.5-6 ms): one thread gives slower but far steadier numbers for both models
        torch.set_num_threads(opts.threads)
    # bf16 is the checkpoint's dtype and the GPU's fast path; most CPUs have no fast bf16 matmul, so fp32 there
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
             "float32": torch.float32, "bfloat16": torch.bfloat16}[opts.dtype]
    return device, dtype


def random_head(cfg, device, seed):
    """GAP's PCA head on a random basis with k ~18% of d, like k at 95% variance for 7B (629 / 3584)."""
    from latent_head import PCAHead
    k = max(1, round(0.18 * cfg.text.hidden_size))
    basis = random_basis(cfg.text.hidden_size, k, seed).to(device)
    return PCAHead(basis, cfg.text.hidden_size).to(device).eval(), basis


def load_hf(m, dtype, device):
    """transformers' Qwen2_5_VLForConditionalGeneration on m's exact weights (through the hub layout on disk)."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(m, tmp)
        hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp, dtype=dtype, attn_implementation="sdpa")
    return hf.to(device).eval()


def time_tasks(tasks, iters):
    """Untimed warm-up (and compilation), then ours and HF interleaved, the order reversed every other round, so a
    neighbour's load drifting over minutes hits both sides alike instead of whichever happened to run second.
    tasks: (row names, who, callable returning seconds per row). -> {who: {row: [seconds per round]}}"""
    times = {"ours": {}, "hf": {}}
    # the warm-up pays one-off costs that no later call does: kernel selection, allocator growth, and with --compile the
    # compilation itself (minutes for a 7B) and the CUDA-graph capture
    for _, _, fn in tasks:
        fn()
    for i in range(iters):
        for names, who, fn in tasks if i % 2 == 0 else tasks[::-1]:
            for name, t in zip(names, fn()):
                if name:
                    times[who].setdefault(name, []).append(t)
    for ours_row, hf_row in (("latent step", "decode"), ("latent (compiled)", "decode (compiled)")):
        if ours_row in times["ours"] and hf_row in times["hf"]:
            times["hf"][ours_row] = times["hf"][hf_row]     # HF has no latent step: its text step is the yardstick
    return times


def step_bytes(m, head, cfg, dtype, B, T, n):
    """Bytes one decode step must read: every trunk weight, lm_head (not the embedding table: one row), and the KV
    cache at the mean context length (a latent step also reads the PCA head: it runs lm_head too, see generate).
    -> ({row: bytes}, KV bytes per token over the batch)."""
    elt = torch.finfo(dtype).bits // 8
    # K and V per token: 2 x layers x KV heads x head_dim x bytes (7B in bf16: 2 x 28 x 4 x 128 x 2 B = 56 KiB per row)
    kv_token = 2 * cfg.text.num_hidden_layers * cfg.text.num_key_value_heads * cfg.text.head_dim * elt * B
    trunk = sum(p.numel() for n_, p in m.model.named_parameters() if not n_.startswith("embed_tokens")) * elt
    head_bytes = sum(p.numel() * p.element_size() for p in head.parameters())
    # the context grows from T to T + n over the run: an average step reads T + n / 2 tokens of K/V
    text = trunk + m.lm_head.weight.numel() * elt + kv_token * (T + n / 2)
    return {"decode": text, "decode (compiled)": text, "latent step": text + head_bytes,
            "latent (compiled)": text + head_bytes}, kv_token


def report(times, res, bytes_per_step, peak, B, T, n):
    """The table: per row ours and HF median ms, spread, ratio, tokens/s, GB/s and the HBM bound; into res too."""
    print(f"\n{'':20s}{'ours ms':>10s}{'±%':>6s}{'HF ms':>10s}{'±%':>6s}{'HF/ours':>9s}{'ours tok/s':>12s}"
          f"{'HF tok/s':>10s}{'GB/s':>8s}{'bound ms':>10s}{'of bound':>10s}")
    for name, xs in times["ours"].items():
        ys = times["hf"].get(name)
        # tokens each timed call consumes (forward, prefill) or produces (a step: one per row; generate: n per row)
        per_call = B * T if name in ("forward", "prefill") else B * n if name.startswith("generate") else B
        o = med(xs)
        r = {"ours_ms": o, "ours_spread_pct": spread(xs), "ours_tok_s": per_call * 1e3 / o}
        line = f"{name:20s}{o:10.2f}{min(spread(xs), 999):6.0f}"
        if ys:
            h = med(ys)
            r.update(hf_ms=h, hf_spread_pct=spread(ys), ratio=h / o, hf_tok_s=per_call * 1e3 / h)
            line += f"{h:10.2f}{min(spread(ys), 999):6.0f}{h / o:8.2f}x"
        else:
            line += f"{'-':>10s}{'':6s}{'-':>9s}"
        line += f"{r['ours_tok_s']:12.1f}" + (f"{r['hf_tok_s']:10.1f}" if ys else f"{'-':>10s}")
        # a decode step at small batch is memory-bound: bytes / time is the bandwidth reached, bytes / peak the fastest
        # the step could possibly run
        if name in bytes_per_step:
            r["gb_s"] = bytes_per_step[name] / (o / 1e3) / 1e9
            line += f"{r['gb_s']:8.1f}"
            if peak:
                r["bound_ms"] = bytes_per_step[name] / peak * 1e3
                r["of_bound"] = r["bound_ms"] / o                 # 1.0 = at the HBM bound
                line += f"{r['bound_ms']:10.3f}{100 * r['of_bound']:9.0f}%"
        print(line)
        # JSON-friendly keys: "decode (compiled)" -> "decode_compiled"
        res[name.replace(" ", "_").replace("(", "").replace(")", "")] = r
    res["latent_vs_decode"] = med(times["ours"]["latent step"]) / med(times["ours"]["decode"])
    print(f"latent step / text decode step: {res['latent_vs_decode']:.2f}")
    if "max_logit_diff" in res:
        print(f"same function: max |logits ours - HF| {res['max_logit_diff']:.2e}, greedy tokens equal "
              f"{100 * res['tokens_match']:.0f}%")


def our_tasks(bundle, ids, pv, grid, n, clk, eager, compiled):
    """Our rows: a forward, prefill + decode step, latent step, end-to-end generate (and the compiled step's rows).
    -> (tasks, the timed generate call)."""
    m, B = bundle.model, ids.shape[0]
    # prepared once, outside the timed calls: the generate row times the model, not image preprocessing
    prompts = [(ids[0].tolist(), pv[:len(pv) // B].cpu(), grid[:1].cpu())] * B   # encode_prompts' output, B rows

    def ours_fwd():
        t0 = clk()
        m(ids, pixel_values=pv, image_grid_thw=grid)
        return clk() - t0

    def ours_e2e(trunk):
        t0 = clk()
        sample.generate(bundle, None, None, prompts=prompts, mode="zero", max_new_tokens=n, compile=trunk.compiled)
        return clk() - t0

    steps = lambda trunk, latent=False: ours_generate(bundle, ids, pv, grid, n, clk, trunk, latent)[:2]
    tasks = [(("forward",), "ours", lambda: (ours_fwd(),)), (("prefill", "decode"), "ours", lambda: steps(eager)),
             ((None, "latent step"), "ours", lambda: steps(eager, True)),
             (("generate",), "ours", lambda: (ours_e2e(eager),))]
    if compiled:
        # CUDA graphs: the compiled runs keep one set of cache buffers (setup_cache reuses a same-shaped set)
        tasks += [((None, "decode (compiled)"), "ours", lambda: steps(compiled)),
                  ((None, "latent (compiled)"), "ours", lambda: steps(compiled, True)),
                  (("generate (compiled)",), "ours", lambda: (ours_e2e(compiled),))]
    return tasks, ours_e2e


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}"


def main(opts: Options):
    # ---- setup: a random model of the preset's shapes, one image + text prompt, GAP's head ----
    device, dtype = setup(opts)
    cfg, n, clk = model.PRESETS[opts.config], opts.decode_steps, Clock(device, opts.cpu_time)
    torch.manual_seed(opts.seed)
    m = build_ours(cfg, dtype, device, opts.seed)
    ids, pv, grid, n_img = make_inputs(cfg, opts, device)
    B, T = ids.shape
    head, basis = random_head(cfg, device, opts.seed)
    bundle = bench_bundle(m, head, basis)
    eager, compiled = sample.get_trunk(bundle, False), sample.get_trunk(bundle, True) if opts.compile else None
    print(f"config {opts.config}: {sum(p.numel() for p in m.parameters()) / 1e6:.1f}M params, {dtype}, "
          f"{device_name(device)}; batch {B}, prompt {T} tokens ({n_img} image + {opts.prompt_len} text), {n} new tokens, median of "
          f"{opts.iters} ({'process CPU' if opts.cpu_time else 'wall'} time)")
    res = {"config": opts.config, "dtype": str(dtype), "batch": B, "prompt_tokens": T, "image_tokens": n_img}

    # ---- what is timed: (row names, who, callable returning seconds per row) ----
    tasks, ours_e2e = our_tasks(bundle, ids, pv, grid, n, clk, eager, compiled)
    if opts.hf:
        hf = load_hf(m, dtype, device)
        tasks += hf_tasks(hf, cfg, ids, pv, grid, n, clk, sample.logit_bias(bundle, "zero", device), compiled, res)

    # ---- timing, then checks that both sides computed the same thing, and the memory of one generate call ----
    times = time_tasks(tasks, opts.iters)
    if opts.hf:
        same_function(m, hf, bundle, cfg, ids, pv, grid, n, clk, eager, res)
        del hf
    if device.type == "cuda":
        res["generate_peak_gb"] = generate_memory(m, device, lambda: ours_e2e(compiled or eager))
    m.clear_cache()

    # ---- the table ----
    bytes_per_step, kv_token = step_bytes(m, head, cfg, dtype, B, T, n)
    report(times, res, bytes_per_step, peak_bandwidth(opts, device), B, T, n)
    if "generate_peak_gb" in res:
        res["kv_cache_gb"] = kv_token * sample.kv_bucket(T + n) / 1e9
        print(f"generate (batch {B}): peak {res['generate_peak_gb']:.2f} GB above the weights, of which KV cache "
              f"{res['kv_cache_gb']:.2f} GB ({sample.kv_bucket(T + n)} slots)")
    print("forward: full prompt, no cache, all logits | prefill: time to first token into a cache (ours: "
          "setup_cache + prefill; HF: generate() to its first token) | decode/latent: per step | generate: tokens/s "
          "over the batch, prefill included | ±%: half min-max range")
    return res


def hf_kwargs(cfg, ids, pv, grid):
    # HF only uses M-RoPE when given mm_token_type_ids
    return dict(input_ids=ids, pixel_values=pv, image_grid_thw=grid,
                mm_token_type_ids=(ids == cfg.image_token_id).long())


def hf_tasks(hf, cfg, ids, pv, grid, n, clk, bias, compiled, res):
    """transformers' rows: a forward, and generate (eager; with --compile also its static cache, warmed up here)."""
    kw = hf_kwargs(cfg, ids, pv, grid)

    def hf_fwd():
        hf.model.rope_deltas = None
        t0 = clk()
        hf(**kw, use_cache=False)
        return clk() - t0

    gen = lambda static=False: hf_generate(hf, ids, pv, grid, n, cfg, clk, bias, static)
    tasks = [(("forward",), "hf", lambda: (hf_fwd(),)), (("prefill", "decode", None, "generate"), "hf", gen)]
    if compiled:
        try:
            gen(static=True)                     # transformers' own warm-up and compilation, untimed
            tasks.append(((None, "decode (compiled)", None, "generate (compiled)"), "hf", lambda: gen(True)))
        except Exception as e:                   # a model transformers cannot give a static cache
            print(f"HF static-cache generate unavailable: {type(e).__name__}: {str(e).splitlines()[0]}")
            res["hf_static_error"] = str(e).splitlines()[0]
    return tasks


def same_function(m, hf, bundle, cfg, ids, pv, grid, n, clk, eager, res):
    """Sanity: the two models really compute the same function on the same inputs (logits, greedy tokens)."""
    hf.model.rope_deltas = None
    # the two differ only by kernel rounding order (fp32 CPU: tiny; bf16 CUDA: larger); greedy tokens flip only where
    # two logits are closer than that, so token agreement is reported as a fraction, not required to be 100%
    res["max_logit_diff"] = (m(ids, pv, grid) - hf(**hf_kwargs(cfg, ids, pv, grid), use_cache=False).logits.float()
                             ).abs().max().item()
    ours_toks = ours_generate(bundle, ids, pv, grid, n, clk, eager)[2]
    hf_toks = hf_generate(hf, ids, pv, grid, n, cfg, clk, sample.logit_bias(bundle, "zero", m.lm_head.weight.device))[2]
    res["tokens_match"] = (ours_toks == hf_toks).float().mean().item()


def generate_memory(m, device, run):
    """What one generate call holds beyond the weights (CUDA): the KV cache plus a few buffers, in GB."""
    m.clear_cache()
    torch.cuda.synchronize(device)
    # the weights (and nothing else: the cache was just freed) are the baseline; the peak above it is one call's cost
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    run()
    return (torch.cuda.max_memory_allocated(device) - base) / 1e9


# ---- the training step (--train) ----


def train_batch(cfg, opts, device):
    """One micro-batch the way train.collate lays it out: the random image + prompt, every token after
    <|vision_end|> supervised (a response), no latent span. -> (batch for train.GAP, labels (B, T) for HF)."""
    ids, pv, grid, _ = make_inputs(cfg, opts, device)
    B, T = ids.shape
    # the text after <|vision_end|> plays the response: 3/4 of the text tokens supervised, like a long answer
    after = torch.arange(T, device=device) > (ids[0] == cfg.vision_end_token_id).nonzero()[0, 0]
    labels = torch.where(after, ids, -100)                                   # (B, T)
    sup = torch.nn.functional.pad(labels[:, 1:] != -100, (0, 1)).flatten()   # (B*T,) position t predicts t+1
    pos, _ = model.get_position_ids(cfg, ids.cpu(), grid.cpu())
    batch = dict(input_ids=ids, pixel_values=pv, image_grid_thw=grid, position_ids=pos.to(device),
                 sup_pos=sup.nonzero().squeeze(1), sup_tgt=labels.flatten().roll(-1)[sup],
                 latent_pos=torch.zeros(0, dtype=torch.long, device=device), targets=None, external={})
    return batch, labels


def ours_trainer(cfg, opts, device, variant):
    """train.GAP on random weights with train.py's precision for the device, -> (step function, n trained params)."""
    import train
    cuda, (ac, comp) = device.type == "cuda", variant
    vlm = build_ours(cfg, torch.float32, device, opts.seed).train()           # fp32 master weights
    for p in vlm.visual.parameters():
        p.requires_grad_(False)                                               # frozen, as train.py's default
    head = random_head(cfg, device, opts.seed)[0]                           # no dropout: eval mode is train mode
    tcfg = train.TrainConfig(activation_checkpointing=ac, compile=comp)
    train.speedups(vlm, tcfg, cuda)
    gap = train.GAP(vlm, head)
    if cuda:   # FSDP2 units with bf16 compute / fp32 reduction, as `train.py --fsdp` (a 1-GPU group: no traffic)
        vlm.visual.to(torch.bfloat16)
        train.shard(gap, tcfg, cuda)
    params = [p for p in gap.parameters() if p.requires_grad]
    # fused on CUDA, as train.py: the whole AdamW update in one kernel per group of tensors
    opt = torch.optim.AdamW(params, lr=1e-5, fused=cuda)
    batch, _ = train_batch(cfg, opts, device)
    n_sup = batch["sup_pos"].numel()

    def step():
        lm_sum, lat_sum, _ = gap(batch, -1)
        # train.py's loss: the LM sum over supervised tokens made a mean (no latent span here, so lat_sum is 0)
        (lm_sum / n_sup + lat_sum).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step, sum(p.numel() for p in params)


def hf_trainer(m, cfg, opts, device):
    """transformers' Qwen2_5_VLForConditionalGeneration on m's weights: loss from labels, backward, AdamW."""
    hf = load_hf(m, torch.float32, device).train()
    for p in hf.model.visual.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in hf.parameters() if p.requires_grad], lr=1e-5)
    batch, labels = train_batch(cfg, opts, device)
    ids = batch["input_ids"]
    kw = dict(input_ids=ids, pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
              mm_token_type_ids=(ids == cfg.image_token_id).long(), labels=labels)

    def step():
        hf.model.rope_deltas = None
        hf(**kw).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def release(cuda):
    """Free the last variant's model, optimizer state and compiled graphs before the next one is built (FSDP state
    and modules reference each other, so only the cycle collector frees them)."""
    gc.collect()
    torch._dynamo.reset()
    if cuda:
        torch.cuda.empty_cache()


def time_step(step, iters, device, clk):
    """One warm-up (and compilation) call, then `iters` timed ones. -> (seconds per call, peak GiB on CUDA)."""
    cuda = device.type == "cuda"
    step()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(iters):
        t0 = clk()
        step()
        times.append(clk() - t0)
    return times, torch.cuda.max_memory_allocated(device) / 2 ** 30 if cuda else None


def train_main(opts):
    # ---- setup: the preset cut to --layers, one micro-batch laid out as train.collate does ----
    import train
    prepare.check_options(opts)
    device = prepare.resolve_device(opts.device)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    cfg = model.PRESETS[opts.config]
    full_depth = cfg.text.num_hidden_layers
    if opts.layers:
        cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, num_hidden_layers=opts.layers))
    cuda, clk = device.type == "cuda", Clock(device, opts.cpu_time)
    if cuda and not dist.is_initialized():   # FSDP2 needs a process group: one rank, no rendezvous
        dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1, device_id=device)
    batch, _ = train_batch(cfg, opts, device)
    B, T = batch["input_ids"].shape
    n_sup = batch["sup_pos"].numel()
    flops = train.train_flops(cfg.text, [T] * B, n_sup)
    peak = train.peak_flops(device)
    print(f"train step, config {opts.config} with {cfg.text.num_hidden_layers} layers, {device_name(device)}: "
          f"micro-batch {B} x {T} tokens ({n_sup} supervised), median of {opts.iters} "
          f"({'process CPU' if opts.cpu_time else 'wall'} time)")

    # ---- timing: train.py's step per variant (CUDA: eager / activation checkpointing / compiled), then HF's ----
    run = lambda step: time_step(step, opts.iters, device, clk)
    res, rows = {"config": opts.config, "layers": cfg.text.num_hidden_layers, "tokens": B * T}, {}
    # CPU: one eager variant, timed against transformers; FSDP, activation checkpointing and compile are GPU levers
    variants = [("ours", (False, False))] if not cuda else \
        [("eager", (False, False)), ("eager + AC", (True, False))] + \
        ([("compiled", (False, True)), ("compiled + AC", (True, True))] if opts.compile else [])
    for name, variant in variants:
        step, n_train = ours_trainer(cfg, opts, device, variant)
        rows[name] = run(step)
        del step
        release(cuda)
    if opts.hf and not cuda:
        m = build_ours(cfg, torch.float32, device, opts.seed)
        step = hf_trainer(m, cfg, opts, device)
        del m
        rows["transformers"] = run(step)

    # ---- the table (and, on CUDA, the full-depth model extrapolated from two depths) ----
    print(f"\n{'':16s}{'ms':>10s}{'±%':>6s}{'tok/s':>10s}{'MFU':>8s}{'peak GiB':>10s}")
    for name, (times, mem) in rows.items():
        ms = med(times)
        r = dict(ms=ms, spread_pct=spread(times), tok_s=B * T * 1e3 / ms, peak_gib=mem,
                 mfu=flops / (ms / 1e3) / peak if peak and name != "transformers" else None)
        res[name.replace(" + ", "_").replace(" ", "_")] = r
        print(f"{name:16s}{ms:10.1f}{min(r['spread_pct'], 999):6.0f}{r['tok_s']:10.0f}" +
              (f"{r['mfu']:8.1%}" if r["mfu"] else f"{'-':>8s}") + (f"{mem:10.1f}" if mem else f"{'-':>10s}"))
    if "transformers" in rows:
        res["ratio"] = med(rows["transformers"][0]) / med(rows["ours"][0])
        print(f"train step: transformers / ours = {res['ratio']:.2f}x (> 1: ours faster)")
    if cuda and opts.layers >= 2:
        res["extrapolated"] = extrapolate(cfg, opts, device, variants[-1], rows[variants[-1][0]], full_depth, T, n_sup,
                                          run, peak)
    print("MFU = (6 x block matmul params x tokens + 6 x d x V x supervised + 6 x L x heads x head_dim x T^2) / "
          "(seconds x peak bf16 FLOP/s), see train.train_flops")
    return res


def extrapolate(cfg, opts, device, variant, measured, full_depth, T, n_sup, run, peak):
    """The full-depth model with --fsdp on --gpus GPUs, from this variant at L and L/2 layers on one GPU:
    per-layer time and activation memory are the differences between the two depths; the rest of a step (embedding,
    ViT, lm_head, loss) is what is left at depth L. Per GPU: fp32 weights + gradients + AdamW state (16 B per trained
    parameter) / G, the bf16 ViT replica, activations for the full depth, and two unsharded bf16 blocks (the one
    computing and the one prefetched). Communication is assumed hidden behind compute (FSDP2 prefetches one block)."""
    import train
    name, (ac, comp) = variant
    L, half = cfg.text.num_hidden_layers, cfg.text.num_hidden_layers // 2
    small = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, num_hidden_layers=half))
    step, _ = ours_trainer(small, opts, device, variant)
    t_half, mem_half = run(step)
    del step
    release(True)
    t_L, mem_L = measured

    def counts(c):   # -> (one block's, trained (all but the frozen ViT), ViT's) parameter counts
        # on meta: parameter counts only, without allocating a byte of the full-depth model
        with torch.device("meta"):
            m = model.Qwen25VL(c)
        n = lambda mod: sum(p.numel() for p in mod.parameters())
        return n(m.model.layers[0]), n(m) - n(m.visual), n(m.visual)
    block, _, vit = counts(cfg)
    trained = lambda c: (None, counts(c)[1])
    GiB = 2 ** 30
    # 16 B per trained parameter: fp32 weight + fp32 gradient + AdamW's two fp32 moments; the frozen ViT is 2 B (bf16)
    acts = lambda mem, c: mem * GiB - 16 * trained(c)[1] - 2 * vit        # what is not weights/grads/AdamW state
    per_layer_act = (acts(mem_L, cfg) - acts(mem_half, small)) / (L - half)
    fixed_act = acts(mem_L, cfg) - L * per_layer_act
    full = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, num_hidden_layers=full_depth))
    G = opts.gpus
    mem = (16 * trained(full)[1] / G + 2 * vit + fixed_act + full_depth * per_layer_act + 2 * 2 * block) / GiB
    s_L, s_half = statistics.median(t_L), statistics.median(t_half)
    # a step's time is linear in depth: the per-layer slope from the two runs, extended to the preset's full depth
    s_full = s_L + (full_depth - L) * (s_L - s_half) / (L - half)
    mfu = train.train_flops(full.text, [T], n_sup) / s_full / peak if peak else None
    print(f"\nextrapolated ({name}, from {half} and {L} layers): {opts.config} at full depth ({full_depth} layers), "
          f"--fsdp on {G} GPUs, micro-batch 1 x {T} tokens: {s_full * 1e3:.0f} ms per micro-batch per GPU "
          f"({T / s_full:.0f} tok/s per GPU" + (f", MFU {mfu:.1%}" if mfu else "") + f"), peak memory "
          f"~{mem:.1f} GiB per GPU; 98.6k example-passes (the paper's recipe) at this length: "
          f"{98.6e3 * s_full / G / 3600:.2f} h")
    return dict(ms_per_micro_batch=s_full * 1e3, mfu=mfu, peak_gib=mem, gpus=G, layers=full_depth)


def cli(opts):
    return train_main(opts) if opts.train else main(opts)   # main runs under no_grad; the train step must not


if __name__ == "__main__":
    prepare.run_main(lambda argv: cli(parse_args(argv)))
