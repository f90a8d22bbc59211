"""
How each attention call runs fast: the scaled_dot_product_attention form a forward uses, picked once per call so
that a fused kernel (flash, memory-efficient, cuDNN) accepts it, with the plain masked form as the reference the fast
forms are tested against (tests/test_generate.py). model.py's Attention executes the plan; nothing else here
knows about Qwen2.5-VL.

    .venv/bin/python -m pytest -q tests/test_generate.py     # every form against the masked reference, on CPU
    .venv/bin/python -m pytest -q tests/test_gpu_generate.py # which SDPA backend each form reaches (CUDA only)
"""
import torch
import torch.nn.functional as F

# torch's fused SDPA kernels each refuse something: flash takes no attn_mask, memory-efficient and cuDNN take no
# enable_gqa (https://github.com/pytorch/pytorch/issues/139586), and anything refused falls back to the math kernel,
# which for 7B upcasts and expands the KV cache 7x per decode step and materialises (B, 28, T, S) fp32 scores at
# prefill (~30 GB for one 16k-token image). So each forward picks, once, a form some fused kernel accepts:
#   causal  prefill with no padding: is_causal over the chunk itself (+ enable_gqa -> flash)
#   rows    left-padded prefill: per row, is_causal over its real suffix (variable length without a mask)
#   decode  one new token against the cache: the g = nh / nkv query heads of a KV group are folded into the query
#           axis, (B, nkv, g, hd) against (B, nkv, L, hd) - no enable_gqa, so a key mask (B, 1, 1, L) is fine for
#           the memory-efficient / cuDNN kernels - and only a bucketed prefix L of the cache is read
#   masked  anything else (a chunk at a non-zero offset, holes in the mask) and the reference the fast forms are
#           tested against: a boolean (B, 1, T, S) mask with enable_gqa


class AttentionPlan:
    def __init__(self, kind, mask=None, starts=None, kv_len=None, gqa=True):
        self.kind, self.mask, self.starts, self.kv_len = kind, mask, starts, kv_len
        self.gqa = gqa    # False: repeat K/V heads instead of enable_gqa (no fused kernel takes GQA for this dtype)


_GQA_FUSED = {}   # (device, dtype) -> bool: does a fused (non-math) SDPA kernel accept enable_gqa + is_causal?


def gqa_is_fused(device, dtype):
    """Detected once per (device, dtype) by trying a tiny call with the math kernel excluded. On CUDA flash takes
    GQA in bf16/fp16 only; in fp32 repeating K/V heads (7x the chunk's K/V, not the cache) keeps memory-efficient."""
    if device.type != "cuda":
        return True                     # CPU: one kernel family either way
    key = (str(device), dtype)
    if key not in _GQA_FUSED:
        if torch.compiler.is_compiling():   # no probe inside a traced graph (train.py --compile): flash's own rule
            return dtype in (torch.float16, torch.bfloat16)
        from torch.nn.attention import SDPBackend, sdpa_kernel
        q = torch.zeros(1, 4, 8, 64, device=device, dtype=dtype)
        kv = torch.zeros(1, 2, 8, 64, device=device, dtype=dtype)
        try:
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                              SDPBackend.EFFICIENT_ATTENTION]):
                F.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=True)
            _GQA_FUSED[key] = True
        except RuntimeError:            # "No available kernel"
            _GQA_FUSED[key] = False
    return _GQA_FUSED[key]


def left_pad_starts(attention_mask):
    """(B, T) 0/1 mask -> per-row count of leading pads (list), or None if the mask is not pads-then-real."""
    am = attention_mask.bool().cpu()
    starts = (~am).sum(1)
    if not bool((am == (torch.arange(am.shape[1]) >= starts[:, None])).all()):
        return None
    return starts.tolist()


def attention_plan(attention_mask, T, S, input_pos, kv_len, device, dtype, fast=True):
    """Decide the attention form of one forward (see above). Prefill plans cost one host sync, decode plans none."""
    masked = lambda: AttentionPlan("masked", attention_mask_4d(attention_mask, T, S, input_pos, device))
    if not fast:
        if attention_mask is None and input_pos is None:
            return AttentionPlan("causal")          # the plain causal case was always is_causal
        return masked()
    if input_pos is not None and T == 1:
        L = kv_len or S
        k_idx = torch.arange(L, device=device)
        mask = (k_idx <= input_pos)[None]                                         # (1, L) causal: written slots
        if attention_mask is not None:
            mask = mask & attention_mask[:, :L].bool()                             # (B, L) real keys
        return AttentionPlan("decode", mask.view(mask.shape[0], 1, 1, L), kv_len=L)
    gqa = gqa_is_fused(device, dtype)
    if input_pos is not None and input_pos[[0, -1]].tolist() != [0, T - 1]:
        return masked()                             # a chunk appended after earlier slots
    starts = None if attention_mask is None else left_pad_starts(attention_mask[:, :T])
    if attention_mask is not None and starts is None:
        return masked()
    if starts is None or not any(starts):
        return AttentionPlan("causal", gqa=gqa)
    return AttentionPlan("rows", starts=starts, gqa=gqa)


def attention_mask_4d(attention_mask, T, S, input_pos, device):
    """Boolean (B|1, 1, T, S) mask: query at sequence index i sees key s iff s <= i and the key is real.
    Each query also sees itself, so a left-pad query never has an empty row (its output is ignored anyway)."""
    q_idx = input_pos if input_pos is not None else torch.arange(T, device=device)
    k_idx = torch.arange(S, device=device)
    mask = k_idx[None, :] <= q_idx[:, None]                                    # (T, S) causal by index
    if attention_mask is not None:
        mask = mask & attention_mask.bool()[:, None, :]                        # (B, T, S)
    mask = mask | (k_idx[None, :] == q_idx[:, None])
    return mask.reshape(-1, 1, T, S)   # (B|1, 1, T, S): 4-D, or CPU SDPA drops to its slow math path
