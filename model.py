"""
Qwen2.5-VL from scratch: vision tower, text decoder with M-RoPE, static KV cache, image preprocessing,
and loading/saving checkpoints in the Hugging Face safetensors layout. One file, top to bottom:
configs -> helpers -> vision tower -> text decoder -> the full model -> positions -> config.json reader ->
checkpoints. Image preprocessing and input errors are in inputs.py, the SDPA form selection in attention.py.

Data flow for one image and a question (shapes for 7B; D = 3584):
    image --preprocess_image--> pixel_values (N, 1176): N 14x14 patches, each 3 channels x 2 frames x 14 x 14
    pixel_values --visual--> image embeddings (N / 4, D):
        PatchEmbed (a linear map per patch) -> 32 VisionBlocks (2D rotary; attention within 112 px windows,
        over the whole image in blocks 7, 15, 23, 31) -> PatchMerger (each 2x2 patch group -> one D-vector)
    input_ids (B, T) --embed--> x (B, T, D): token embeddings, every <|image_pad|> replaced by the next image embedding
    input_ids --get_position_ids--> M-RoPE positions (3, B, T): (t, row, col) on image tokens, equal on text tokens
    x --decode: 28 DecoderLayers (GQA attention with M-RoPE, SwiGLU MLP) + final RMSNorm--> h̄ (B, T, D)
    h̄ --lm_head--> logits (B, T, 152064)

    import model
    m = model.load_pretrained("Qwen2.5-VL-7B-Instruct", dtype=torch.bfloat16, device="cuda")
    pixel_values, image_grid_thw = model.preprocess_image(PIL.Image.open("cat.png"))
    logits = m(input_ids, pixel_values=pixel_values, image_grid_thw=image_grid_thw)   # (B, T, vocab)

Below the convenience call the trunk is explicit, so text, image tokens and GAP latents share one path:
    x = m.embed(input_ids, pixel_values, image_grid_thw)     # (B, T, D) input embeddings
    pos, rope_deltas = m.position_ids(input_ids, image_grid_thw, attention_mask)   # (3, B, T) M-RoPE ids
    h = m.decode(x, pos, attention_mask)                      # (B, T, D) final-normed hidden state h̄
    logits = m.lm_head(h)

    .venv/bin/python -m pytest -q tests/test_model.py     # parity with transformers on tiny random checkpoints
    .venv/bin/python bench.py --config small              # speed against transformers, same weights and inputs

The reference is transformers' implementation, which the tests match to ~1e-5 in fp32:
    https://github.com/huggingface/transformers/blob/main/src/transformers/models/qwen2_5_vl/modeling_qwen2_5_vl.py
    https://github.com/huggingface/transformers/blob/main/src/transformers/models/qwen2_vl/image_processing_qwen2_vl.py
Only torch, safetensors, numpy and PIL are imported: transformers is a test oracle, never a dependency.
"""

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

# Two leaf files hold what is not the network itself; every name stays reachable as model.X.
from attention import (AttentionPlan, attention_mask_4d, attention_plan, gqa_is_fused,  # noqa: F401
                       left_pad_starts)
from inputs import (DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, IMAGE_MEAN, IMAGE_STD, MAX_DECODE_PIXELS,  # noqa: F401
                    DataError, data_error, load_image, open_safetensors, preprocess_image, read_json,
                    read_pixel_limits, smart_resize, write_text_atomic)

# ---------------------------------------------------------------------------------------------------------------
# ---- configs ----
# Defaults are the real Qwen2.5-VL-7B values; field names are the HF config.json names.


@dataclass
class VisionConfig:
    depth: int = 32                      # ViT blocks
    hidden_size: int = 1280              # ViT width (D)
    intermediate_size: int = 3420        # SwiGLU width inside the ViT
    num_heads: int = 16                  # head_dim 80
    in_channels: int = 3                 # hub files spell it in_chans
    patch_size: int = 14                 # pixels per patch side
    temporal_patch_size: int = 2         # an image is duplicated to 2 frames
    spatial_merge_size: int = 2          # 2x2 patches -> one LLM token (28x28 px)
    window_size: int = 112               # window attention side in pixels (4x4 merged tokens)
    fullatt_block_indexes: tuple = (7, 15, 23, 31)  # blocks that attend over the whole image
    out_hidden_size: int = 3584          # merger output = text hidden size
    hidden_act: str = "silu"
    tokens_per_second: int = 2           # video only (out of scope); kept for round trips


@dataclass
class TextConfig:
    vocab_size: int = 152064             # embedding rows (the tokenizer has 151665 entries)
    hidden_size: int = 3584              # D
    intermediate_size: int = 18944       # SwiGLU width
    num_hidden_layers: int = 28
    num_attention_heads: int = 28        # head_dim = 3584 / 28 = 128
    num_key_value_heads: int = 4         # GQA 7:1
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    mrope_section: tuple = (16, 24, 24)  # T | H | W split of the 64 rotary frequencies
    max_position_embeddings: int = 128000
    hidden_act: str = "silu"

    @property
    def head_dim(self):
        return self.hidden_size // self.num_attention_heads


@dataclass
class Config:
    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    tie_word_embeddings: bool = False    # 3B ties lm_head to the embedding; 7B does not
    image_token_id: int = 151655         # <|image_pad|>
    video_token_id: int = 151656         # <|video_pad|>
    vision_start_token_id: int = 151652  # <|vision_start|>
    vision_end_token_id: int = 151653    # <|vision_end|>
    bos_token_id: int = 151643           # <|endoftext|>; never prepended
    eos_token_id: int = 151645           # <|im_end|>

    # config.json is read and written by the loading code at the end of this file
    @classmethod
    def from_json(cls, path):
        return read_config(path)

    @classmethod
    def from_dict(cls, d, source="config"):
        return config_from_dict(d, source)

    def to_dict(self):
        return config_to_dict(self)


def _tiny():
    # Token ids mirror Qwen's layout minus 151000: 643 BPE tokens, then the 22 specials at 643..664.
    return Config(
        text=TextConfig(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, mrope_section=(2, 3, 3)),
        vision=VisionConfig(depth=4, hidden_size=32, intermediate_size=64, num_heads=2,
                            fullatt_block_indexes=(1, 3), out_hidden_size=64),
        image_token_id=655, video_token_id=656, vision_start_token_id=652, vision_end_token_id=653,
        bos_token_id=643, eos_token_id=645)


PRESETS = {
    "tiny": _tiny(),
    # meaningful on CPU: real vision width with depth cut to 4, a narrow 8-layer decoder, the real vocabulary
    "small": Config(text=TextConfig(hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                                    num_attention_heads=8, num_key_value_heads=2, mrope_section=(8, 12, 12)),
                    vision=VisionConfig(depth=4, fullatt_block_indexes=(1, 3), out_hidden_size=512)),
    "3b": Config(text=TextConfig(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                                 num_attention_heads=16, num_key_value_heads=2),
                 vision=VisionConfig(out_hidden_size=2048), tie_word_embeddings=True),
    "7b": Config(),
}

# ---------------------------------------------------------------------------------------------------------------
# ---- shared helpers ----


class RMSNorm(nn.Module):
    """Qwen2 RMSNorm: normalise in fp32, cast back to the input dtype, *then* scale by the (model-dtype) weight."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        u = x.float()
        u = u * torch.rsqrt(u.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * u.to(x.dtype)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); the vision blocks have biases, the text decoder (and GAP's latent heads, which
    reuse it with out = k) do not. out defaults to dim."""

    def __init__(self, dim, hidden, bias, out=None):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, out or dim, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rotate_half(x):
    # HF's rotate-half convention: [x1 | x2] -> [-x2 | x1] (not interleaved pairs), so no weight is ever permuted
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x, cos, sin):
    return x * cos + rotate_half(x) * sin


def inv_freq(dim, theta, device=None):
    # computed on the fly (no buffers): cheap, and nothing is left on `meta` after loading
    return 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim)


# ---------------------------------------------------------------------------------------------------------------
# ---- vision tower ----


def vision_rotary_angles(grid_thw, head_dim, merge, device=None):
    """Vision 2D rotary (theta 1e4): per patch, angles [row * f | col * f] (head_dim/2 values) in the processor's
    block-major patch order (the 4 patches of each 2x2 merge block are consecutive)."""
    f = inv_freq(head_dim // 2, 10000.0, device)      # head_dim/4 frequencies, exponent over head_dim/2
    rows, cols = [], []
    for t, h, w in grid_thw.tolist():
        r = torch.arange(h, device=device)[:, None].expand(h, w)
        c = torch.arange(w, device=device)[None, :].expand(h, w)
        # (h, w) -> (h/m, m, w/m, m) -> (h/m, w/m, m, m): the 2x2 merge blocks come out contiguous
        r = r.reshape(h // merge, merge, w // merge, merge).transpose(1, 2).flatten()
        c = c.reshape(h // merge, merge, w // merge, merge).transpose(1, 2).flatten()
        rows.append(r.repeat(t))
        cols.append(c.repeat(t))
    rows, cols = torch.cat(rows).float(), torch.cat(cols).float()
    return torch.cat([rows[:, None] * f, cols[:, None] * f], dim=-1)   # (N, head_dim/2)


def window_index(grid_thw, window_merged, merge):
    """Permutation of merged tokens into windows (window_merged x window_merged merged tokens, partial at the
    right/bottom edges), and the window boundaries in *patch* units. Empty windows are simply never produced."""
    index, cu, offset = [], [0], 0
    for t, h, w in grid_thw.tolist():
        gh, gw = h // merge, w // merge
        ids = torch.arange(t * gh * gw).reshape(t, gh, gw)
        for ti in range(t):
            for r0 in range(0, gh, window_merged):
                for c0 in range(0, gw, window_merged):
                    win = ids[ti, r0:r0 + window_merged, c0:c0 + window_merged].flatten()
                    index.append(win + offset)
                    cu.append(cu[-1] + win.numel() * merge * merge)
        offset += t * gh * gw
    return torch.cat(index), torch.tensor(cu)


class Segments:
    """Plan for attention inside each segment [cu[i], cu[i+1]) of a packed sequence, never across segments.
    Segments of equal length run as one SDPA batch with no mask at all (so CUDA can pick flash / memory-efficient
    kernels): one group per distinct length. A 448x448 image has 16 windows of 64 patches, one group; mixed image
    sizes add one group per size (full-attention blocks) and per edge-window shape, a handful, and nothing is ever
    padded to the largest segment. Planned once per forward on the host (cu_seqlens is a few ints per image), so the
    32 blocks pay no host syncs; a single group of contiguous equal segments is a free view."""

    def __init__(self, cu_seqlens, device):
        lens, starts = cu_seqlens.diff(), cu_seqlens[:-1]
        self.groups = []                                                         # (n_seg, L) token indices
        for L in lens.unique().tolist():
            idx = starts[lens == L][:, None] + torch.arange(L)                   # (n_seg, L)
            self.groups.append(idx.to(device))
        self.contiguous = len(self.groups) == 1                                  # all equal: segments are a view

    def attention(self, q, k, v):
        """q, k, v: (N, nh, hd) -> (N, nh, hd), bidirectional within each segment."""
        N, nh, hd = q.shape
        if self.contiguous:
            S, L = self.groups[0].shape
            qs, ks, vs = (t.view(S, L, nh, hd).transpose(1, 2) for t in (q, k, v))      # (S, nh, L, hd)
            return F.scaled_dot_product_attention(qs, ks, vs).transpose(1, 2).reshape(N, nh, hd)
        out = torch.empty_like(q)
        for idx in self.groups:
            qs, ks, vs = (t[idx].transpose(1, 2) for t in (q, k, v))                     # (n_seg, nh, L, hd)
            y = F.scaled_dot_product_attention(qs, ks, vs).transpose(1, 2)              # (n_seg, L, nh, hd)
            out[idx.flatten()] = y.reshape(-1, nh, hd)
        return out


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.nh = cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=True)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=True)

    def forward(self, x, segments, cos, sin):
        N, D = x.shape
        q, k, v = self.qkv(x).view(N, 3, self.nh, D // self.nh).unbind(1)   # (N, nh, hd) each
        # the vision rotation runs in fp32 and is cast back; the text decoder rotates in the activation dtype instead:
        # copying one tower's precision policy to the other breaks bit-parity with transformers
        q = apply_rotary(q.float(), cos, sin).to(x.dtype)
        k = apply_rotary(k.float(), cos, sin).to(x.dtype)
        return self.proj(segments.attention(q, k, v).reshape(N, D))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_size, 1e-6)   # eps is hard-coded for the ViT (not in config.json)
        self.norm2 = RMSNorm(cfg.hidden_size, 1e-6)
        self.attn = VisionAttention(cfg)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, bias=True)

    def forward(self, x, segments, cos, sin):
        x = x + self.attn(self.norm1(x), segments, cos, sin)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        k = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=k, stride=k, bias=False)

    def forward(self, x):
        # A stride==kernel Conv3d on one (C, T, P, P) patch is a matmul with the flattened kernel; the 1176 columns
        # are already in (C, T, y, x) order. Inputs are cast to the weight dtype first, so bf16 rounding of the
        # normalised pixels is part of the reference.
        w = self.proj.weight
        return F.linear(x.to(w.dtype), w.view(w.shape[0], -1))


class PatchMerger(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d = cfg.hidden_size * cfg.spatial_merge_size ** 2
        self.ln_q = RMSNorm(cfg.hidden_size, 1e-6)
        # mlp.1 is the parameter-free exact (erf) GELU, hence no `mlp.1.*` keys on disk
        self.mlp = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, cfg.out_hidden_size))

    def forward(self, x):
        x = self.ln_q(x)
        return self.mlp(x.view(-1, self.mlp[0].in_features))   # (N/4, 4*D): the 4 patches of a merged token


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg)

    def forward(self, pixel_values, grid_thw):
        """pixel_values (N, C*T*P*P) in the processor's block-major order, grid_thw (n_images, 3) ->
        (N / merge^2, out_hidden_size) merged embeddings in raster order per image, images concatenated."""
        cfg, m = self.cfg, self.cfg.spatial_merge_size
        grid_thw = grid_thw.cpu()     # shapes and windows are planned on the host (they are a few ints per image)
        n_patches = int(grid_thw.prod(-1).sum())
        if pixel_values.shape[0] != n_patches:
            raise ValueError(f"pixel_values has {pixel_values.shape[0]} patches but image_grid_thw "
                             f"{grid_thw.tolist()} needs {n_patches}")
        x = self.patch_embed(pixel_values)                                   # (N, D)
        N, D, g = x.shape[0], x.shape[1], m * m
        ang = vision_rotary_angles(grid_thw, D // cfg.num_heads, m, x.device)
        win, cu_win = window_index(grid_thw, cfg.window_size // m // cfg.patch_size, m)
        win = win.to(x.device)
        # window order: permute merged tokens (groups of 4 patches) and the rotary table the same way
        # (skipping the windowing moves outputs by ~0.5: windows are part of the model, not an optimisation)
        x = x.view(N // g, g, D)[win].view(N, D)
        ang = ang.view(N // g, g, -1)[win].view(N, -1)
        emb = torch.cat([ang, ang], dim=-1)[:, None, :]                      # (N, 1, hd) broadcast over heads
        cos, sin = emb.cos(), emb.sin()
        # full-attention blocks: one segment per frame (windows keep frames contiguous, so this holds in window order)
        cu_full = F.pad(torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0]).cumsum(0), (1, 0))
        full, windows = Segments(cu_full, x.device), Segments(cu_win, x.device)
        for i, blk in enumerate(self.blocks):
            x = blk(x, full if i in cfg.fullatt_block_indexes else windows, cos, sin)
        x = self.merger(x)                                                   # (N/4, out) still in window order
        return x[torch.argsort(win)]                                         # back to raster order


# ---------------------------------------------------------------------------------------------------------------
# ---- text decoder ----


def mrope_cos_sin(position_ids, cfg: TextConfig, dtype):
    """M-RoPE: position_ids (3, B, T) -> cos, sin (B, 1, T, head_dim). Angles in fp32; each contiguous frequency
    section takes its positions from one axis (T | H | W), then both halves repeat; cast to the activation dtype."""
    f = inv_freq(cfg.head_dim, cfg.rope_theta, position_ids.device)          # (hd/2,)
    ang = position_ids.float()[..., None] * f                                 # (3, B, T, hd/2)
    ang = torch.cat([a[i] for i, a in enumerate(ang.split(list(cfg.mrope_section), dim=-1))], dim=-1)  # (B, T, hd/2)
    emb = torch.cat([ang, ang], dim=-1)[:, None]                              # (B, 1, T, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


class KVCache(nn.Module):
    """Static, preallocated cache (B, n_kv, S, hd): written in place at explicit slots, never grown by cat."""

    def __init__(self, batch_size, max_seq_len, n_kv, head_dim, dtype, device):
        super().__init__()
        shape = (batch_size, n_kv, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos, k, v):
        """Write k, v (B', nkv, T, hd) at slots input_pos into the first B' rows (B' < B: a prefill that
        Qwen25VL.spread_cache then copies to the other rows) -> those rows' whole cache."""
        B = k.shape[0]
        self.k[:B].index_copy_(2, input_pos, k)
        self.v[:B].index_copy_(2, input_pos, v)
        return self.k[:B], self.v[:B]


# Which SDPA form a forward uses (causal, rows, decode, masked) is decided once per call in attention.py.


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.nh, self.nkv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.nh * self.hd, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=True)
        self.o_proj = nn.Linear(self.nh * self.hd, cfg.hidden_size, bias=False)
        self.kv_cache = None

    def causal(self, q, k, v, gqa):
        if not gqa:
            g = self.nh // self.nkv
            k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)   # (B, nh, T, hd)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)

    def forward(self, x, cos, sin, plan, input_pos):
        B, T, _ = x.shape
        g = self.nh // self.nkv
        q = self.q_proj(x).view(B, T, self.nh, self.hd).transpose(1, 2)     # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)    # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)
        q, k, v = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v   # rotated in the activation dtype
        kc, vc = self.kv_cache.update(input_pos, k, v) if input_pos is not None else (k, v)   # (B, nkv, S, hd)
        # GQA: query head j reads kv head j // g (repeat_interleave convention, as transformers' repeat_kv)
        if plan.kind == "decode":
            L = plan.kv_len
            qf = q.reshape(B, self.nkv, g, self.hd)                           # (B, nkv, g, hd): heads on the query axis
            y = F.scaled_dot_product_attention(qf, kc[:, :, :L], vc[:, :, :L], attn_mask=plan.mask)
            y = y.view(B, self.nh, 1, self.hd)                                # (B, nh, 1, hd)
        elif plan.kind == "causal":
            y = self.causal(q, k, v, plan.gqa)
        elif plan.kind == "rows":
            # a left pad query attends to itself only (the masked reference's rule), so its output is its own value
            y = v.repeat_interleave(g, dim=1)                                 # (B, nh, T, hd)
            for b, s in enumerate(plan.starts):
                y[b:b + 1, :, s:] = self.causal(q[b:b + 1, :, s:], k[b:b + 1, :, s:], v[b:b + 1, :, s:], plan.gqa)
        else:
            y = F.scaled_dot_product_attention(q, kc, vc, attn_mask=plan.mask, enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, bias=False)

    def forward(self, x, cos, sin, mask, input_pos):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, input_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class TextModel(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


# ---------------------------------------------------------------------------------------------------------------
# ---- the full model ----


class Qwen25VL(nn.Module):
    """Module names are the checkpoint's key names: visual.*, model.*, lm_head.weight."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.visual = VisionTransformer(cfg.vision)
        self.model = TextModel(cfg.text)
        self.lm_head = nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.fast_attention = True   # False: every call takes the plain masked SDPA form (the parity reference)

    def embed(self, input_ids, pixel_values=None, image_grid_thw=None):
        """Token embeddings with each <|image_pad|> overwritten, in row-major order, by the next image feature."""
        x = self.model.embed_tokens(input_ids)                                 # (B, T, D)
        if pixel_values is None:
            # checked on prompts only: a one-token decode step must not pay a host sync
            if input_ids.shape[1] > 1 and bool((input_ids == self.cfg.image_token_id).any()):
                raise ValueError("input_ids hold <|image_pad|> tokens but no pixel_values were given")
            return x
        is_image = input_ids == self.cfg.image_token_id
        n_pads = int(is_image.sum())
        feats = self.visual(pixel_values, image_grid_thw).to(x.dtype)         # (N_merged, D)
        if feats.shape[0] != n_pads:
            raise ValueError(f"input_ids hold {n_pads} <|image_pad|> tokens but the images give {feats.shape[0]} "
                             f"embeddings (image_grid_thw {image_grid_thw.tolist()})")
        return x.masked_scatter(is_image[..., None], feats)

    def position_ids(self, input_ids, image_grid_thw=None, attention_mask=None):
        return get_position_ids(self.cfg, input_ids, image_grid_thw, attention_mask)

    def decode(self, x, position_ids, attention_mask=None, input_pos=None, return_layers=False, kv_len=None):
        """The trunk: input embeddings (B, T, D) + explicit M-RoPE positions (3, B, T) -> final-normed h̄ (B, T, D).
        With input_pos (T,) the chunk's keys/values go to those cache slots and attention reads the cache (a one-token
        step reads only the first kv_len slots, default all: every slot it must see has to lie below kv_len);
        attention_mask (B, S) marks real keys (S = T, or the cache length)."""
        B, T, _ = x.shape
        S = T if input_pos is None else self.model.layers[0].self_attn.kv_cache.k.shape[2]
        cos, sin = mrope_cos_sin(position_ids, self.cfg.text, x.dtype)
        plan = attention_plan(attention_mask, T, S, input_pos, kv_len, x.device, x.dtype, self.fast_attention)
        layers = [x]
        for layer in self.model.layers:
            x = layer(x, cos, sin, plan, input_pos)
            if return_layers:
                layers.append(x)
        h = self.model.norm(x)
        return (h, layers) if return_layers else h

    def forward(self, input_ids, pixel_values=None, image_grid_thw=None, attention_mask=None, position_ids=None):
        x = self.embed(input_ids, pixel_values, image_grid_thw)
        if position_ids is None:
            position_ids, _ = self.position_ids(input_ids, image_grid_thw, attention_mask)
        return self.lm_head(self.decode(x, position_ids, attention_mask)).float()   # logits (B, T, V) in fp32

    def setup_cache(self, batch_size, max_seq_len, dtype=None, device=None):
        """Static KV caches for every layer. Caches of the same shape, dtype and device are kept (and zeroed): a
        compiled decode step replays CUDA graphs that hold the buffers' addresses, so one eval reuses one set."""
        w = self.lm_head.weight
        dtype, device = dtype or w.dtype, torch.device(device or w.device)
        for layer in self.model.layers:
            a, c = layer.self_attn, layer.self_attn.kv_cache
            if c is not None and c.k.shape == (batch_size, a.nkv, max_seq_len, a.hd) and c.k.dtype == dtype \
                    and c.k.device == device:
                c.k.zero_(), c.v.zero_()
            else:
                a.kv_cache = None                     # free the old buffers before allocating the new ones
                a.kv_cache = KVCache(batch_size, max_seq_len, a.nkv, a.hd, dtype, device)

    def spread_cache(self, n, length):
        """Prefill once, sample n times: cache row b (of the first B / n, written by a B / n-row prefill) is copied to
        rows b*n .. b*n + n - 1 over slots [0, length)."""
        for layer in self.model.layers:
            c = layer.self_attn.kv_cache
            B = c.k.shape[0] // n
            for buf in (c.k, c.v):
                buf[:, :, :length] = buf[:B, :, :length].repeat_interleave(n, dim=0)   # (B * n, nkv, length, hd)

    def clear_cache(self):
        for layer in self.model.layers:
            layer.self_attn.kv_cache = None


# ---------------------------------------------------------------------------------------------------------------
# ---- M-RoPE position ids ----


def get_position_ids(cfg: Config, input_ids, image_grid_thw=None, attention_mask=None):
    """(3, B, T) positions and rope_deltas (B,). Text advances all three axes together; an image's merged tokens
    get (cur, cur + row, cur + col); text after an image resumes at max + 1. Left pads get position 1 (ignored).
    A token appended later at padded index s gets position s + rope_deltas[b] on all axes; latent pads are plain text."""
    B, T = input_ids.shape
    m = cfg.vision.spatial_merge_size
    grids = image_grid_thw.tolist() if image_grid_thw is not None else []
    pos = torch.ones(3, B, T, dtype=torch.long)
    deltas = torch.zeros(B, dtype=torch.long)
    ids_all = input_ids.cpu()
    keep_all = attention_mask.cpu().bool() if attention_mask is not None else torch.ones(B, T, dtype=torch.bool)
    n_img = 0
    for b in range(B):
        ids = ids_all[b][keep_all[b]]
        is_img = (ids == cfg.image_token_id).tolist()
        chunks, cur, i = [], 0, 0
        while i < len(ids):
            if is_img[i]:
                if n_img >= len(grids):
                    raise ValueError(f"row {b}: more images in input_ids than image_grid_thw rows ({len(grids)})")
                t, h, w = grids[n_img]
                n_img += 1
                gh, gw = h // m, w // m
                n = t * gh * gw
                if not all(is_img[i:i + n]) or i + n > len(ids):
                    raise ValueError(f"row {b}: image {n_img - 1} with grid {[t, h, w]} needs {n} consecutive "
                                     f"<|image_pad|> tokens at index {i}")
                tt = torch.arange(t).repeat_interleave(gh * gw)
                hh = torch.arange(gh).repeat_interleave(gw).repeat(t)
                ww = torch.arange(gw).repeat(t * gh)
                chunk = torch.stack([tt, hh, ww]) + cur                        # (3, n)
                i += n
            else:
                j = i
                while j < len(ids) and not is_img[j]:
                    j += 1
                chunk = torch.arange(cur, cur + j - i).expand(3, -1)          # (3, n) text
                i = j
            chunks.append(chunk)
            cur = int(chunk.max()) + 1
        if chunks:
            p = torch.cat(chunks, dim=1)
            pos[:, b, keep_all[b]] = p
            deltas[b] = int(p.max()) + 1 - T
    if n_img != len(grids):
        raise ValueError(f"image_grid_thw has {len(grids)} images but input_ids hold {n_img} image runs")
    return pos.to(input_ids.device), deltas.to(input_ids.device)


# ---------------------------------------------------------------------------------------------------------------
# ---- reading config.json strictly: a key that changes the math and that we do not support raises ----


def read_config(path):
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read config: {e}") from None
    return config_from_dict(d, source=str(path))


def config_from_dict(d, source="config"):
    """Read a hub-style flat config (text keys at the top, `rope_scaling`, `in_chans`) or a transformers-5
    nested one (`text_config`, `rope_parameters`). Keys that change the math and that we do not support raise."""
    top = {k: v for k, v in d.items() if k not in ("text_config", "vision_config")}
    # Nested wins over flat, except where it is null: transformers 4.53-4.57 re-save the 7B with
    # "image_token_id": null (and video/vision ids) inside text_config next to the real ids at the top level.
    nested = {k: v for k, v in (d.get("text_config") or {}).items() if v is not None}
    text = {**top, **nested}
    vision = {k: v for k, v in (d.get("vision_config") or {}).items() if v is not None}
    t = _read_keys(TextConfig, text, _TEXT_IGNORED, f"{source}: text config", _check_text)
    v = _read_keys(VisionConfig, vision, _VISION_IGNORED, f"{source}: vision_config", _check_vision)
    ids = {f.name: text[f.name] for f in fields(Config) if f.name.endswith("_token_id") and f.name in text}
    if isinstance(ids.get("eos_token_id"), list) and ids["eos_token_id"]:   # several stop ids: the first is
        ids["eos_token_id"] = ids["eos_token_id"][0]                       # <|im_end|>
    for k, i in ids.items():
        if isinstance(i, bool) or not isinstance(i, int) or i < 0:
            raise ValueError(f"{source}: {k}: expected a non-negative integer token id, found {i!r}")
    tie = {"tie_word_embeddings": bool(text["tie_word_embeddings"])} if "tie_word_embeddings" in text else {}
    cfg = Config(text=t, vision=v, **ids, **tie)
    if v.out_hidden_size != t.hidden_size:
        raise DataError(f"{source}: vision_config.out_hidden_size {v.out_hidden_size} != hidden_size "
                         f"{t.hidden_size}: the merger must output text-width embeddings")
    if sum(t.mrope_section) * 2 != t.head_dim:
        raise DataError(f"{source}: mrope_section {list(t.mrope_section)} must sum to head_dim/2 = "
                        f"{t.head_dim // 2}")
    return cfg


# Keys that do not change the math (generic HF bookkeeping, dropout, inert sliding-window settings): listed once.
_COMMON_IGNORED = {"architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "initializer_range",
                   "_name_or_path", "use_cache", "return_dict", "output_hidden_states", "output_attentions",
                   "pad_token_id", "attention_dropout", "vision_token_id", "sliding_window", "max_window_layers",
                   "name_or_path", "id2label", "label2id", "problem_type", "tokenizer_class", "spatial_patch_size",
                   "chunk_size_feed_forward", "is_encoder_decoder", "tie_word_embeddings", "image_token_id",
                   "video_token_id", "vision_start_token_id", "vision_end_token_id", "bos_token_id", "eos_token_id"}
_TEXT_IGNORED = _COMMON_IGNORED | {"use_sliding_window", "layer_types", "rope_scaling", "rope_parameters", "head_dim"}
_VISION_IGNORED = _COMMON_IGNORED | {"in_chans", "rope_parameters"}


def _read_keys(cls, d, ignored, where, check):
    known = {f.name for f in fields(cls)}
    unknown = sorted(k for k in d if k not in known and k not in ignored)
    if unknown:
        raise DataError(f"{where}: unsupported key(s) {unknown}; gap does not know what they do to the math")
    kw = {k: d[k] for k in known if k in d}
    check(d, kw, where)
    for k in ("mrope_section", "fullatt_block_indexes"):
        if k in kw:
            kw[k] = tuple(kw[k])
    return cls(**kw)


def _check_text(d, kw, where):
    if d.get("hidden_act", "silu") != "silu":
        raise DataError(f"{where}: hidden_act {d['hidden_act']!r} is not supported (only 'silu')")
    if d.get("use_sliding_window"):
        raise DataError(f"{where}: use_sliding_window=true is not supported (Qwen2.5-VL uses full attention)")
    if any(x != "full_attention" for x in d.get("layer_types") or []):
        raise DataError(f"{where}: layer_types {set(d['layer_types'])} is not supported (only full_attention)")
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "mrope"):
        raise DataError(f"{where}: rope type {kind!r} is not supported (only mrope)")
    if "mrope_section" in rope:
        kw["mrope_section"] = rope["mrope_section"]
    if "rope_theta" in rope:
        kw["rope_theta"] = rope["rope_theta"]
    if rope.get("factor", 1.0) != 1.0:
        raise DataError(f"{where}: rope scaling factor {rope['factor']} is not supported")
    if "head_dim" in d and d["head_dim"] != d.get("hidden_size", TextConfig.hidden_size) // d.get(
            "num_attention_heads", TextConfig.num_attention_heads):
        raise DataError(f"{where}: head_dim {d['head_dim']} != hidden_size / num_attention_heads is not supported")


def _check_vision(d, kw, where):
    if d.get("hidden_act", "silu") != "silu":
        raise DataError(f"{where}: hidden_act {d['hidden_act']!r} is not supported (only 'silu')")
    if "in_chans" in d and "in_channels" not in d:
        kw["in_channels"] = d["in_chans"]
    if d.get("spatial_patch_size", d.get("patch_size", 14)) != d.get("patch_size", 14):
        raise DataError(f"{where}: spatial_patch_size != patch_size is not supported")
    rope = d.get("rope_parameters") or {}
    if rope.get("rope_theta", 10000.0) != 10000.0 or rope.get("rope_type", "axial") not in ("axial", "default"):
        raise DataError(f"{where}: vision rope_parameters {rope} are not supported (2D rotary, theta 10000)")


def config_to_dict(cfg):
    """Hub-style flat config.json, as the official checkpoints ship it (transformers reads it back)."""
    t, v = asdict(cfg.text), asdict(cfg.vision)
    d = {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl"}
    d.update({k: t[k] for k in t if k != "mrope_section"})
    d["rope_scaling"] = {"type": "mrope", "mrope_section": list(cfg.text.mrope_section)}
    d.update({f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in ("text", "vision")})
    d["use_sliding_window"] = False
    v["fullatt_block_indexes"] = list(v["fullatt_block_indexes"])
    d["vision_config"] = v
    return d


# ---------------------------------------------------------------------------------------------------------------
# ---- loading and saving checkpoints (HF safetensors layout) ----

# transformers >= 4.52 holds these names in memory and some tools save them; map them back to the hub names
_KEY_PREFIXES = (("model.language_model.", "model."), ("model.visual.", "visual."))


def _hub_name(key):
    for old, new in _KEY_PREFIXES:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def _checkpoint_files(path):
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(read_json(index)["weight_map"].values()))
        missing = [f for f in files if not (path / f).exists()]
        if missing:
            raise DataError(f"{index} names shard file(s) that do not exist: {missing}")
        return [path / f for f in files]
    # only model*.safetensors: a GAP output folder also holds latent_head.safetensors and pca.safetensors
    files = [path / "model.safetensors"] if (path / "model.safetensors").exists() else sorted(path.glob("model*.safetensors"))
    if not files:
        raise DataError(f"{path}: no model.safetensors, model.safetensors.index.json or model-*.safetensors")
    return files


def load_pretrained(path, dtype=torch.float32, device="cpu"):
    """Build on `meta`, read safetensors straight to `device`, load strictly. Every missing, unexpected or
    mis-shaped key is reported in one error."""
    path = Path(path)
    cfg = Config.from_json(path / "config.json")
    with torch.device("meta"):
        m = Qwen25VL(cfg)
    state, origin = {}, {}
    for f in _checkpoint_files(path):
        with open_safetensors(f, device) as sf:
            for k in sf.keys():
                name = _hub_name(k)
                state[name] = sf.get_tensor(k).to(dtype)
                origin[name] = f.name
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)    # tied: the embedding serves as lm_head (and is loaded once)
    expected = {k: v.shape for k, v in m.state_dict().items() if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} ({origin[k]}) vs model {tuple(expected[k])}"
                  for k in sorted(set(state) & set(expected)) if state[k].shape != expected[k]]
    if missing or unexpected or mismatched:
        show = lambda keys: ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")
        found = "; ".join(f"{len(keys)} {what}: {show(keys)}" for what, keys in (
            ("missing", missing), ("unexpected", unexpected), ("of another shape", mismatched)) if keys)
        raise data_error(path, "weights", f"expected the tensors of its config.json, found {found}")
    if cfg.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    m.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_word_embeddings:
        m.lm_head.weight = m.model.embed_tokens.weight   # assign=True broke the tie; restore it
    return m.eval()


def save_pretrained(m: Qwen25VL, path, max_shard_bytes=5 * 1024 ** 3, state_dict=None):
    """config.json (hub flat layout) + model.safetensors, or shards + model.safetensors.index.json above the size.
    state_dict: full tensors to write instead of m's own (e.g. gathered from FSDP shards by train.py)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = m.cfg
    state = {k: v.detach().contiguous().cpu() for k, v in (state_dict or m.state_dict()).items()
             if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    d = cfg.to_dict()
    d["torch_dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    (path / "config.json").write_text(json.dumps(d, indent=2) + "\n")
    shards, size = [{}], 0
    for k, v in state.items():
        n = v.numel() * v.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += n
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], path / "model.safetensors", metadata=meta)
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, path / name, metadata=meta)
        weight_map.update({k: name for k in shard})
    total = sum(v.numel() * v.element_size() for v in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
