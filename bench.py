"""Speed of our Qwen2.5-VL against transformers on the same random weights, inputs and process: prefill, greedy text
decoding with the static KV cache, and one GAP latent step (PCA head -> trunk). Ratios are transformers / ours (> 1
means we are faster); on CUDA also the HBM lower bound of a decode step and the bandwidth we reach (gpt-fast's line).

    .venv/bin/python bench.py --config tiny --iters 3                 # seconds, CPU
    .venv/bin/python bench.py --config small --threads 1 --cpu-time   # the CPU preset, steady on a shared machine
    python bench.py --config 7b --device cuda --compile               # bf16 on one GPU, plus a compiled decode step

How each number is taken: an untimed warm-up, then --iters rounds with ours and HF interleaved (order reversed
every other round), torch.cuda.synchronize around every clock read, the median reported:
  forward   ours m(ids, image) vs HF model(..., use_cache=False): the whole prompt, vision tower + logits for all T
  prefill   time to first token into a cache: ours setup_cache + position_ids + embed + decode(input_pos) + last
            logits + argmax; HF generate() up to its first logits-processor call (so including generate's own setup)
  decode    per token, greedy: ours one decode step (embed_tokens -> decode(input_pos) -> lm_head -> argmax, no host
            sync) per token; HF generate(min=max=n new tokens, its default cache), timed between logits-processor
            calls, i.e. (t_n - t_1) / (n - 1) with prefill excluded exactly
  latent    ours only: v = PCAHead(h) fed back as the next input embedding (no lm_head), per step
"""

import statistics
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

import model
import prepare

# ---- options ----


@dataclass
class Options:
    config: str = field(default="small", metadata={"help": "model preset", "choices": list(model.PRESETS)})
    device: str = field(default="cpu", metadata={"help": "cpu or cuda", "choices": ["cpu", "cuda"]})
    dtype: str = field(default="auto", metadata={"help": "auto = bfloat16 on cuda, float32 on cpu",
                                                 "choices": ["auto", "float32", "bfloat16"]})
    prompt_len: int = field(default=64, metadata={"min": 1, "help": "text tokens around the image"})
    image_size: int = field(default=448,
                            metadata={"min": 28, "help": "side of the random square image (448 -> 256 tokens)"})
    decode_steps: int = field(default=32, metadata={"min": 2, "help": "new tokens per greedy run (>= 2)"})
    iters: int = field(default=5, metadata={"min": 1, "help": "timed repetitions; the median is reported"})
    hf: bool = field(default=True, metadata={"help": "also run transformers (--no-hf: ours only)"})
    compile: bool = field(default=False, metadata={"help": "also time a torch.compile'd decode step"})
    hbm_gbs: float = field(default=0.0,
                           metadata={"min": 0, "help": "peak memory bandwidth in GB/s (auto for H100 SXM/H200)"})
    seed: int = field(default=0, metadata={"help": "weights, image and prompt seed"})
    threads: int = field(default=0,
                         metadata={"min": 0, "help": "CPU threads (0 = torch's default); 1 on a shared machine"})
    cpu_time: bool = field(default=False, metadata={"help": "time by process CPU time (needs --threads 1)"})


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
    """A random image + text prompt: text, <|vision_start|>, N <|image_pad|>, <|vision_end|>, text."""
    rng = np.random.default_rng(opts.seed)
    img = Image.fromarray(rng.integers(0, 256, (opts.image_size, opts.image_size, 3), dtype=np.uint8))
    pv, grid = model.preprocess_image(img)
    n_img = int(grid.prod()) // cfg.vision.spatial_merge_size ** 2
    text = torch.from_numpy(rng.integers(0, cfg.bos_token_id, opts.prompt_len))   # plain BPE ids, below specials
    a = opts.prompt_len // 4
    ids = torch.cat([text[:a], torch.tensor([cfg.vision_start_token_id] + [cfg.image_token_id] * n_img +
                                            [cfg.vision_end_token_id]), text[a:]])[None]    # (1, T)
    return ids.to(device), pv.to(device), grid.to(device), n_img


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


# ---- our generation path (static cache, no host syncs after prefill) ----


def decode_step(m, tok, input_pos, delta):
    """One text token (B,) at cache slot input_pos (1,) -> next greedy token (B,), h̄ (B, 1, D). A token appended at
    padded index s gets M-RoPE position s + rope_deltas on all three axes (model.get_position_ids)."""
    pos = (delta[:, None] + input_pos[None, :]).expand(3, -1, -1)            # (3, B, 1)
    h = m.decode(m.model.embed_tokens(tok[:, None]), pos, input_pos=input_pos)
    return m.lm_head(h[:, -1]).argmax(-1), h


def latent_step(m, head, h, input_pos, delta):
    """GAP: the previous h̄ (B, 1, D) -> v̂ = P_k c + mu (fp32, Eq. 1) -> next input embedding -> new h̄."""
    pos = (delta[:, None] + input_pos[None, :]).expand(3, -1, -1)            # (3, B, 1)
    return m.decode(head(h).to(h.dtype), pos, input_pos=input_pos)


def ours_generate(m, ids, pv, grid, n, clk, step=decode_step, caches=None):
    """Prefill into the static cache, then n-1 decode steps. -> (ttft s, decode s per token, tokens (B, n)).
    caches: reuse these KVCache modules instead of setup_cache (a compiled step keeps its buffers' addresses)."""
    B, T = ids.shape
    dev = ids.device
    t0 = clk()
    if caches is None:
        m.setup_cache(B, T + n)
    else:
        for layer, c in zip(m.model.layers, caches):
            layer.self_attn.kv_cache = c
    pos, delta = m.position_ids(ids, grid)
    h = m.decode(m.embed(ids, pv, grid), pos, input_pos=torch.arange(T, device=dev))
    toks = [m.lm_head(h[:, -1]).argmax(-1)]
    t1 = clk()
    slots = torch.arange(T, T + n - 1, device=dev)
    for i in range(n - 1):
        tok, h = step(m, toks[-1], slots[i:i + 1], delta)
        toks.append(tok.clone())                # clone: a CUDA-graph output is overwritten by the next replay
    t2 = clk()
    return t1 - t0, (t2 - t1) / (n - 1), torch.stack(toks, 1)


def ours_latents(m, head, ids, pv, grid, n, clk):
    """Prefill (untimed), then n latent steps. -> seconds per latent step."""
    B, T = ids.shape
    m.setup_cache(B, T + n)
    pos, delta = m.position_ids(ids, grid)
    h = m.decode(m.embed(ids, pv, grid), pos, input_pos=torch.arange(T, device=ids.device))[:, -1:]
    slots = torch.arange(T, T + n, device=ids.device)
    t0 = clk()
    for i in range(n):
        h = latent_step(m, head, h, slots[i:i + 1], delta)
    return (clk() - t0) / n


def hf_generate(hf, ids, pv, grid, n, cfg, clk):
    """HF greedy generate with a logits processor that stamps the clock once per new token."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class Stamp(LogitsProcessor):
        def __init__(self):
            self.t = []

        def __call__(self, input_ids, scores):
            self.t.append(clk())                # HF syncs every step anyway (its stopping criteria)
            return scores

    stamp = Stamp()
    hf.model.rope_deltas = None                 # HF keeps M-RoPE state between calls: start clean
    t0 = clk()
    out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pv, image_grid_thw=grid,
                      mm_token_type_ids=(ids == cfg.image_token_id).long(), max_new_tokens=n, min_new_tokens=n,
                      do_sample=False, pad_token_id=cfg.eos_token_id, logits_processor=LogitsProcessorList([stamp]))
    t = stamp.t
    return t[0] - t0, (t[-1] - t[0]) / (n - 1), out[:, ids.shape[1]:]


# ---- the benchmark ----


@torch.no_grad()
def main(opts: Options):
    prepare.check_options(opts)
    if opts.config in ("3b", "7b") and opts.device != "cuda":
        raise prepare.DataError(f"--config: expected --device cuda with {opts.config} (a {opts.config} decode on CPU "
                                f"says nothing), found --device {opts.device}")
    if opts.cpu_time and (opts.device == "cuda" or opts.threads != 1):
        raise prepare.DataError("--cpu-time: expected --device cpu --threads 1 (it measures one CPU thread), found "
                                f"--device {opts.device} --threads {opts.threads}")
    device = torch.device(opts.device)
    if opts.threads:
        # on a shared 2-core box, 2 OpenMP threads stall whenever a neighbour holds one core (a 4x1x16 @ 4x16x338
        # bmm went from 3 us to 0.5-6 ms): one thread gives slower but far steadier numbers for both models
        torch.set_num_threads(opts.threads)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
             "float32": torch.float32, "bfloat16": torch.bfloat16}[opts.dtype]
    cfg, n, clk = model.PRESETS[opts.config], opts.decode_steps, Clock(device, opts.cpu_time)
    torch.manual_seed(opts.seed)
    m = build_ours(cfg, dtype, device, opts.seed)
    ids, pv, grid, n_img = make_inputs(cfg, opts, device)
    B, T = ids.shape
    n_params = sum(p.numel() for p in m.parameters())
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}"
    print(f"config {opts.config}: {n_params / 1e6:.1f}M params, {dtype}, {dev_name}; prompt {T} tokens "
          f"({n_img} image + {opts.prompt_len} text), {n} new tokens, median of {opts.iters} "
          f"({'process CPU' if opts.cpu_time else 'wall'} time)")
    res = {"config": opts.config, "dtype": str(dtype), "prompt_tokens": T, "image_tokens": n_img}

    def ours_fwd():
        t0 = clk()
        m(ids, pixel_values=pv, image_grid_thw=grid)
        return clk() - t0

    # every measurement: (row names, who, callable returning seconds per row)
    tasks = [(("forward",), "ours", lambda: (ours_fwd(),)),
             (("prefill", "decode"), "ours", lambda: ours_generate(m, ids, pv, grid, n, clk)[:2])]
    if opts.hf:
        from transformers import Qwen2_5_VLForConditionalGeneration
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(m, tmp)
            hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp, dtype=dtype, attn_implementation="sdpa")
        hf = hf.to(device).eval()
        kw = dict(input_ids=ids, pixel_values=pv, image_grid_thw=grid,
                  mm_token_type_ids=(ids == cfg.image_token_id).long())    # HF only uses M-RoPE when given these

        def hf_fwd():
            hf.model.rope_deltas = None
            t0 = clk()
            hf(**kw, use_cache=False)
            return clk() - t0

        tasks += [(("forward",), "hf", lambda: (hf_fwd(),)),
                  (("prefill", "decode"), "hf", lambda: hf_generate(hf, ids, pv, grid, n, cfg, clk)[:2])]
    if opts.compile:
        # gpt-fast: CUDA graphs for the decode step; the compiled runs keep one set of cache buffers (their addresses
        # are baked into the graph), the eager runs in between get fresh ones from setup_cache
        step = torch.compile(decode_step, mode="reduce-overhead" if device.type == "cuda" else None, fullgraph=True)
        m.setup_cache(B, T + n)
        caches = [layer.self_attn.kv_cache for layer in m.model.layers]
        tasks.append(((None, "decode (compiled)"), "ours",
                      lambda: ours_generate(m, ids, pv, grid, n, clk, step, caches)[:2]))
    try:
        from latent_head import PCAHead
        k = max(1, round(0.18 * cfg.text.hidden_size))    # ~18% of d, like k at 95% variance for 7B (629 / 3584)
        head = PCAHead(random_basis(cfg.text.hidden_size, k, opts.seed), cfg.text.hidden_size).to(device)
        head_bytes = sum(p.numel() * p.element_size() for p in head.parameters())
        tasks.append((("latent step",), "ours", lambda: (ours_latents(m, head, ids, pv, grid, n, clk),)))
    except ImportError as e:
        print(f"latent step skipped: latent_head.py not importable ({e})")

    # untimed warm-up (and compilation), then ours and HF interleaved, the order reversed every other round, so a
    # neighbour's load drifting over minutes hits both sides alike instead of whichever happened to run second
    times = {"ours": {}, "hf": {}}
    for _, _, fn in tasks:
        fn()
    for i in range(opts.iters):
        for names, who, fn in tasks if i % 2 == 0 else tasks[::-1]:
            for name, t in zip(names, fn()):
                if name:
                    times[who].setdefault(name, []).append(t)
    rows_ours, rows_hf = times["ours"], times["hf"]
    if "decode (compiled)" in rows_ours and "decode" in rows_hf:
        rows_hf["decode (compiled)"] = rows_hf["decode"]        # the same HF numbers, against our compiled step
    if opts.hf:   # sanity: the two models really compute the same function on the same inputs
        hf.model.rope_deltas = None
        res["max_logit_diff"] = (m(ids, pv, grid) - hf(**kw, use_cache=False).logits.float()).abs().max().item()
        ours_toks = ours_generate(m, ids, pv, grid, n, clk)[2]
        res["tokens_match"] = (ours_toks == hf_generate(hf, ids, pv, grid, n, cfg, clk)[2]).float().mean().item()
        del hf
    m.clear_cache()

    # bytes one decode step must read: every trunk weight, lm_head (not the embedding table: one row), and the KV
    # cache at the mean context length; a latent step reads the head instead of lm_head
    elt = torch.finfo(dtype).bits // 8
    trunk = sum(p.numel() for n_, p in m.model.named_parameters() if not n_.startswith("embed_tokens")) * elt
    kv = 2 * cfg.text.num_hidden_layers * cfg.text.num_key_value_heads * cfg.text.head_dim * (T + n / 2) * elt * B
    step_bytes = {"decode": trunk + m.lm_head.weight.numel() * elt + kv}
    step_bytes["decode (compiled)"] = step_bytes["decode"]
    if "latent step" in rows_ours:
        step_bytes["latent step"] = trunk + kv + head_bytes
    peak = peak_bandwidth(opts, device)

    print(f"\n{'':20s}{'ours ms':>10s}{'±%':>6s}{'HF ms':>10s}{'±%':>6s}{'HF/ours':>9s}{'ours tok/s':>12s}"
          f"{'HF tok/s':>10s}{'GB/s':>8s}{'bound ms':>10s}")
    for name, xs in rows_ours.items():
        ys = rows_hf.get(name)
        per_call = T if name in ("forward", "prefill") else 1          # tokens each timed call produces/consumes
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
        if name in step_bytes:
            r["gb_s"] = step_bytes[name] / (o / 1e3) / 1e9
            line += f"{r['gb_s']:8.1f}"
            if peak:
                r["bound_ms"] = step_bytes[name] / peak * 1e3
                line += f"{r['bound_ms']:10.3f}"
        print(line)
        res[name.replace(" ", "_").replace("(", "").replace(")", "")] = r
    if "latent step" in rows_ours:
        res["latent_vs_decode"] = med(rows_ours["latent step"]) / med(rows_ours["decode"])
        print(f"latent step / text decode step: {res['latent_vs_decode']:.2f} (the latent step skips lm_head)")
    if "max_logit_diff" in res:
        print(f"same function: max |logits ours - HF| {res['max_logit_diff']:.2e}, greedy tokens equal "
              f"{100 * res['tokens_match']:.0f}%")
    print("forward: full prompt, no cache, all logits | prefill: time to first token into a cache (ours: "
          "setup_cache + prefill; HF: generate() to its first token) | decode: per token | ±%: half min-max range")
    return res


if __name__ == "__main__":
    prepare.run_main(lambda argv: main(parse_args(argv)))
