"""Tests for the fast generation paths: attention forms against the masked SDPA reference on left-padded batches,
the ViT on mixed image sizes, the compiled decode step against eager, prefill-once sampling, and torchrun sharding of
eval / score against one process. CPU, tiny random model.
    .venv/bin/python -m pytest -q tests/test_generate.py
"""
import torch
import pytest

import model as gapmodel
from test_sample import image, tiny_model


def left_padded(cfg, lens=(9, 5, 7), seed=0):
    """Random text ids (B, T), left-padded to the longest row, and the 0/1 mask."""
    g = torch.Generator().manual_seed(seed)
    T = max(lens)
    ids = torch.full((len(lens), T), cfg.bos_token_id)
    mask = torch.zeros(len(lens), T, dtype=torch.long)
    for b, n in enumerate(lens):
        ids[b, T - n:] = torch.randint(0, cfg.bos_token_id, (n,), generator=g)
        mask[b, T - n:] = 1
    return ids, mask


@pytest.fixture(scope="module")
def m():
    return tiny_model()


def both(m, fn):
    """fn() with the fast attention forms and with the masked reference."""
    m.fast_attention = True
    fast = fn()
    m.fast_attention = False
    try:
        ref = fn()
    finally:
        m.fast_attention = True
    return fast, ref


def test_plans_pick_the_fused_forms():
    dev, f32 = torch.device("cpu"), torch.float32
    plan = lambda am, T, S, pos, L=None: gapmodel.attention_plan(am, T, S, pos, L, dev, f32).kind
    ids, mask = left_padded(gapmodel.PRESETS["tiny"])
    assert plan(None, 9, 9, None) == "causal"
    assert plan(torch.ones(3, 9), 9, 9, None) == "causal"
    assert plan(mask, 9, 9, None) == "rows"
    cache_mask = torch.cat([mask, torch.ones(3, 7, dtype=mask.dtype)], 1)     # (B, S = 16)
    assert plan(cache_mask, 9, 16, torch.arange(9)) == "rows"                  # prefill into a cache
    assert plan(cache_mask, 1, 16, torch.tensor([9]), 16) == "decode"
    holes = mask.clone()
    holes[0, -2] = 0
    assert plan(holes, 9, 9, None) == "masked"                                  # not pads-then-real
    assert plan(None, 2, 16, torch.arange(9, 11)) == "masked"                   # a chunk after earlier slots


@torch.no_grad()
def test_fast_attention_equals_masked_reference_left_padded(m):
    ids, mask = left_padded(m.cfg)
    fast, ref = both(m, lambda: m(ids, attention_mask=mask))
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)               # every position, pads included
    fast, ref = both(m, lambda: m(ids[1:2, -5:]))                              # one unpadded row: is_causal
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def cached_greedy(m, ids, mask, steps=6, bucket=8):
    """Prefill then one-token steps reading a bucketed prefix of the cache -> h̄ per step (B, steps, D)."""
    B, T = ids.shape
    S = T + steps + bucket                                                      # spare slots past the last write
    m.setup_cache(B, S)
    cache_mask = torch.cat([mask, torch.ones(B, S - T, dtype=mask.dtype)], 1)
    pos, delta = m.position_ids(ids, None, mask)
    h = m.decode(m.embed(ids), pos, cache_mask, input_pos=torch.arange(T))[:, -1]
    out = []
    for i in range(steps):
        tok = m.lm_head(h).argmax(-1)
        s = T + i
        L = -(-(s + 1) // bucket) * bucket                                      # round up to the bucket
        p = (s + delta).view(1, B, 1).expand(3, B, 1)
        h = m.decode(m.embed(tok[:, None]), p, cache_mask, input_pos=torch.tensor([s]), kv_len=L)[:, 0]
        out.append(h)
    return torch.stack(out, 1)


def test_decode_step_equals_masked_reference(m):
    ids, mask = left_padded(m.cfg)
    fast, ref = both(m, lambda: cached_greedy(m, ids, mask))
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_vision_mixed_sizes_unpadded(m):
    """Two images of different sizes in one ViT call == each alone (no padding, no cross-talk), windows of several
    shapes included (a 20x28-patch grid has partial edge windows)."""
    imgs = [image(280, 392, 1), image(112, 168, 2), image(280, 392, 3)]
    pre = [gapmodel.preprocess_image(i) for i in imgs]
    pv, grid = torch.cat([p for p, _ in pre]), torch.cat([g for _, g in pre])
    together = m.visual(pv, grid)
    alone = torch.cat([m.visual(p, g) for p, g in pre])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
