"""Oracle tests for model.py: parity with transformers' Qwen2.5-VL on tiny random safetensors checkpoints,
cached vs recomputed decoding, image preprocessing bit-exactness, and strict loading.

    .venv/bin/python -m pytest -q tests/test_model.py          # ~25 s on 2 CPU cores
    .venv/bin/python -m pytest -q tests/test_model.py -s       # also prints the largest difference per test

Everything runs in float32 with eager attention on the HF side (sdpa differs by ~1e-7); tolerance ATOL below.
HF only uses M-RoPE when it gets mm_token_type_ids, so every HF call with images passes them (hf_tiny.hf_logits).
"""
import dataclasses
import io
import json
import os
import shutil
import warnings
import zlib

import pytest
import torch
from safetensors.torch import load_file, save_file

import hf_tiny as H
import model
from conftest import assert_close, record

# fp32 parity threshold. Our model uses F.linear for the patch embedding and SDPA where HF uses Conv3d and eager
# attention, so the two sum in different orders. Measured against a float64 run of the same weights, HF's own fp32
# logits are off by ~1.2e-5 and ours by ~6.6e-6 (outputs up to ~6-9 in magnitude), so 1e-5 is below the round-off
# floor; 3e-5 is ~2-3x that floor. Deliberately broken copies of model.py (no windows, tanh GELU, swapped vision
# rotary axes, swapped M-RoPE sections, missing +1 after an image, repeat-instead-of-interleave GQA) all fail.
ATOL = 3e-5
SHARD = "100KB"  # ~10 shards for the tiny model: exercises model.safetensors.index.json

# Image layouts (t, h, w) in patches. Merged grids larger than the 4x4 window, with partial windows.
G_WIDE = (1, 20, 28)    # merged 10x14: windows 3x4, last row/col partial
G_SQUARE = (1, 16, 16)  # merged 8x8: exact windows (HF pads, then drops empty windows)
G_LARGE = (1, 44, 60)   # merged 22x30: 6x8 windows, partial in both directions
G_SMALL = (1, 6, 4)     # merged 3x2: a single partial window


# ---- fixtures: checkpoints built once per session ----

@pytest.fixture(scope="session")
def ckpts(tmp_path_factory):
    """{(tied, fmt): dir} for fmt in nested (transformers-5 save), flat (hub-style config.json), sharded."""
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for tied in (False, True):
        hf = H.build_hf(tie=tied, seed=int(tied))
        for fmt in ("nested", "flat", "sharded"):
            d = str(root / f"{'tied' if tied else 'untied'}-{fmt}")
            H.save_hf(hf, d, flat=fmt == "flat", max_shard_size=SHARD if fmt == "sharded" else None)
            out[(tied, fmt)] = d
    return out


@pytest.fixture(scope="session")
def base(ckpts):
    return ckpts[(False, "nested")]


@pytest.fixture(scope="session")
def hf(base):
    return H.load_hf(base)


@pytest.fixture(scope="session")
def ours(base):
    return model.load_pretrained(base, dtype=torch.float32)


def build_ids(*parts):
    """parts: ints (that many random text tokens) or grid tuples (an image block) -> (1, T) long."""
    ids = []
    for i, p in enumerate(parts):
        ids += H.text_ids(p, seed=100 + i) if isinstance(p, int) else H.image_block(p)
    return torch.tensor([ids])


def case(name):
    """(input_ids (1,T), pixel_values or None, image_grid_thw or None) for a named logits case."""
    if name == "text":
        return build_ids(23), None, None
    layouts = {"one_image": [(G_WIDE,), (5, G_WIDE, 7)],
               "two_images": [(G_WIDE, G_SQUARE), (4, G_WIDE, 6, G_SQUARE, 3)],
               "large_image": [(G_LARGE,), (3, G_LARGE, 5)]}
    grids, parts = layouts[name]
    pv, grid = H.random_pixels(list(grids), seed=len(name))
    return build_ids(*parts), pv, grid


def left_padded_batch():
    """Two prompts of different lengths with images, left-padded; pixel_values/grids concatenated in batch order."""
    rows = [[6, (1, 8, 12), 3], [3, (1, 12, 8), 5, (1, 4, 4), 9]]
    seqs = [build_ids(*r)[0] for r in rows]
    grids = [g for r in rows for g in r if isinstance(g, tuple)]
    pv, grid = H.random_pixels(grids, seed=7)
    T = max(len(s) for s in seqs)
    ids = torch.full((2, T), H.BOS, dtype=torch.long)  # <|endoftext|> is Qwen's pad token
    mask = torch.zeros(2, T, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, T - len(s):] = s
        mask[b, T - len(s):] = 1
    assert mask.sum(1).tolist() != [T, T]
    n_patch = [int(torch.tensor(g).prod()) for g in grids]
    pv_rows = [pv[:n_patch[0]], pv[n_patch[0]:]]          # row 0 has one image, row 1 the other two
    grid_rows = [grid[:1], grid[1:]]
    return ids, mask, pv, grid, seqs, pv_rows, grid_rows


# ---- vision tower ----

@pytest.mark.parametrize("grids", [[G_SQUARE], [G_WIDE, G_SQUARE], [G_SMALL, (1, 36, 12), G_WIDE]],
                         ids=["one", "two_sizes", "three_partial"])
def test_vision_tower(ours, hf, grids):
    pv, grid = H.random_pixels(grids, seed=1)
    with torch.no_grad():
        got = ours.visual(pv, grid)
        want = hf.model.visual(pv, grid_thw=grid).pooler_output
    assert got.shape == (sum(H.n_tokens(g) for g in grids), 64)
    assert_close("vision", got, want, ATOL)


# ---- logits ----

@pytest.mark.parametrize("name", ["text", "one_image", "two_images", "large_image"])
def test_logits(ours, hf, name):
    ids, pv, grid = case(name)
    with torch.no_grad():
        got = ours(ids, pixel_values=pv, image_grid_thw=grid)
    want = H.hf_logits(hf, ids, pv, grid)
    assert got.dtype == torch.float32
    assert_close("logits", got, want, ATOL)


def test_logits_left_padded_batch(ours, hf):
    ids, mask, pv, grid, *_ = left_padded_batch()
    with torch.no_grad():
        got = ours(ids, pixel_values=pv, image_grid_thw=grid, attention_mask=mask)
    want = H.hf_logits(hf, ids, pv, grid, attention_mask=mask)
    real = mask.bool()
    assert_close("logits (real tokens)", got[real], want[real], ATOL)


def test_hidden_states(ours, hf):
    """decode(return_layers=True): embeddings + each block's output (pre-norm), and the normed final state."""
    ids, pv, grid = case("two_images")
    pos, _ = ours.position_ids(ids, grid)
    with torch.no_grad():
        x = ours.embed(ids, pixel_values=pv, image_grid_thw=grid)
        h, layers = ours.decode(x, pos, return_layers=True)
        out = hf(input_ids=ids, pixel_values=pv, image_grid_thw=grid, mm_token_type_ids=H.mm_token_type_ids(ids),
                 output_hidden_states=True)
        hf.model.rope_deltas = None
        hs = out.hidden_states  # HF: embeddings, block outputs..., and the LAST entry is after the final norm
        assert len(layers) == len(hs) == 3
        assert_close("embeddings", x, hs[0], ATOL)
        assert_close("layers[0]", layers[0], hs[0], ATOL)
        assert_close("layers[1]", layers[1], hs[1], 2 * ATOL)  # residual stream reaches ~11 here
        assert_close("norm(layers[-1])", hf.model.language_model.norm(layers[-1]), hs[-1], ATOL)
        assert_close("h_bar", h, hs[-1], ATOL)
        assert_close("lm_head(h_bar)", ours.lm_head(h), out.logits, ATOL)


# ---- position ids ----

@pytest.mark.parametrize("name", ["text", "one_image", "two_images", "large_image"])
def test_position_ids(ours, hf, name):
    ids, _, grid = case(name)
    got, delta = ours.position_ids(ids, grid)
    want, want_delta = hf.model.get_rope_index(ids, H.mm_token_type_ids(ids), image_grid_thw=grid)
    assert got.dtype == torch.long and got.shape == (3, 1, ids.shape[1])
    assert torch.equal(got, want)
    assert delta.shape == (1,) and delta.tolist() == want_delta.view(-1).tolist()
    if name == "text":
        assert torch.equal(got, torch.arange(ids.shape[1]).expand(3, 1, -1)) and delta.item() == 0


def test_position_ids_left_padded(ours, hf):
    ids, mask, _, grid, seqs, _, grid_rows = left_padded_batch()
    got, delta = ours.position_ids(ids, grid, mask)
    want, want_delta = hf.model.get_rope_index(ids, H.mm_token_type_ids(ids), image_grid_thw=grid,
                                               attention_mask=mask)
    real = mask.bool()
    assert torch.equal(got[:, real], want[:, real])
    assert (got[:, ~real] == 1).all(), "contract: left pads get position 1"
    # Contract: a later token at padded index s gets s + rope_deltas[b]. HF 5.23 counts unpadded tokens instead
    # (cumsum(mask) - 1 + delta), so ours = HF's delta - number of pads.
    n_pad = (1 - mask).sum(1)
    assert delta.tolist() == (want_delta.view(-1) - n_pad).tolist()
    # Each row alone (no padding) gives the same real-token positions.
    for b, (s, g) in enumerate(zip(seqs, grid_rows)):
        alone, d = ours.position_ids(s[None], g)
        assert torch.equal(alone[:, 0], got[:, b, real[b]])
        assert d.item() == delta[b].item() + n_pad[b].item()


# ---- preprocessing ----

IMAGES = [((333, 517), "RGB"), ((40, 30), "RGB"), ((200, 1000), "RGB"), ((64, 64), "RGB"), ((3000, 2000), "RGB"),
          ((57, 85), "L"), ((77, 91), "RGBA"), ((90, 60), "P")]


def make_image(hw, mode):
    if mode == "P":  # palette image with a transparent index: HF composites it onto white too
        img = H.pil_image(*hw, mode="RGB", seed=3).convert("P")
        img.info["transparency"] = 0
        return img
    return H.pil_image(*hw, mode=mode, seed=hw[0])


@pytest.mark.parametrize("hw,mode", IMAGES, ids=[f"{h}x{w}-{m}" for (h, w), m in IMAGES])
def test_preprocess_matches_hf(hw, mode):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    img = make_image(hw, mode)
    want = Qwen2VLImageProcessorPil()(images=img, return_tensors="pt")
    pv, grid = model.preprocess_image(img)
    assert pv.dtype == torch.float32 and grid.dtype == torch.long
    assert grid.tolist() == want["image_grid_thw"].tolist()
    assert pv.shape == want["pixel_values"].shape
    record("pixel_values", pv, want["pixel_values"])
    assert torch.equal(pv, want["pixel_values"]), "preprocess_image must match the HF PIL backend bit for bit"


def test_preprocess_pixel_limits():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    img = H.pil_image(333, 517, seed=5)
    for lo, hi in [(56 * 56, 28 * 28 * 64), (28 * 28 * 300, 28 * 28 * 1280)]:
        want = Qwen2VLImageProcessorPil(min_pixels=lo, max_pixels=hi)(images=img, return_tensors="pt")
        pv, grid = model.preprocess_image(img, min_pixels=lo, max_pixels=hi)
        assert grid.tolist() == want["image_grid_thw"].tolist()
        assert torch.equal(pv, want["pixel_values"])


def test_smart_resize_matches_hf():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize
    sizes = [(333, 517), (40, 30), (2000, 3000), (1, 1), (14, 14), (42, 70), (70, 42), (98, 126), (1, 200),
             (5000, 25), (28 * 37, 28 * 41), (1234, 987), (10, 1999)]
    for h, w in sizes:
        for lo, hi in [(56 * 56, 28 * 28 * 1280), (3136, 12845056), (28 * 28 * 4, 28 * 28 * 16)]:
            assert model.smart_resize(h, w, factor=28, min_pixels=lo, max_pixels=hi) == \
                tuple(hf_smart_resize(h, w, factor=28, min_pixels=lo, max_pixels=hi)), (h, w, lo, hi)


def png_claiming(w, h):
    """A valid PNG header that claims w x h grey pixels but carries almost no data: opening it is free,
    decoding it would allocate w*h bytes. Used to check the pixel cap fires before decoding."""
    def chunk(kind, data):
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")
    ihdr = w.to_bytes(4, "big") + h.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])   # 8-bit greyscale
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
            + chunk(b"IEND", b""))


def test_preprocess_rejects_bad_images(tmp_path):
    from PIL import Image
    for bad in [Image.new("RGB", (0, 10)), Image.new("RGB", (10, 0)), Image.new("RGB", (1, 250)),
                Image.new("RGB", (201 * 2, 2))]:
        with pytest.raises(ValueError):
            model.preprocess_image(bad)
    # Over the hard pixel cap, as an already-opened (lazy) PIL image: PIL's own bomb check is switched off so the
    # cap in model.py is what rejects it, before any pixel is decoded.
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        huge = Image.open(io.BytesIO(png_claiming(40000, 40000)))
        assert huge.size == (40000, 40000)
        with pytest.raises(ValueError, match="cap"):
            model.preprocess_image(huge)
    finally:
        Image.MAX_IMAGE_PIXELS = old


def test_preprocess_paths(tmp_path):
    """preprocess_image also takes a path: same result as the opened image; unusable files raise ValueError."""
    from PIL import Image
    img = H.pil_image(123, 77, seed=9)
    good = tmp_path / "good.png"
    img.save(good)
    pv, grid = model.preprocess_image(str(good))
    pv2, grid2 = model.preprocess_image(Image.open(good))
    assert torch.equal(pv, pv2) and torch.equal(grid, grid2)
    over = 10000  # 1e8 pixels: over model.MAX_DECODE_PIXELS, under PIL's hard 2x limit (only a warning there)
    assert over * over > model.MAX_DECODE_PIXELS
    (tmp_path / "huge.png").write_bytes(png_claiming(over, over))
    (tmp_path / "text.png").write_text("this is not an image\n")
    (tmp_path / "truncated.png").write_bytes(good.read_bytes()[:200])
    bad = [str(tmp_path / n) for n in ["huge.png", "text.png", "truncated.png", "missing.png"]]
    bad += [io.BytesIO(b"not an image"), b"not an image either"]   # file objects / bytes: PIL.Image.open's inputs
    for x in bad:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # PIL's DecompressionBombWarning for huge.png
            with pytest.raises(ValueError):
                model.preprocess_image(x)


# ---- checkpoint variants ----

@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("fmt", ["nested", "flat", "sharded"])
def test_checkpoint_variants(ckpts, tied, fmt):
    d = ckpts[(tied, fmt)]
    if fmt == "sharded":
        assert os.path.exists(os.path.join(d, "model.safetensors.index.json"))
    keys = set(json.load(open(os.path.join(d, "model.safetensors.index.json")))["weight_map"]) if fmt == "sharded" \
        else set(load_file(os.path.join(d, "model.safetensors")))
    assert ("lm_head.weight" in keys) != tied, "HF drops lm_head.weight from tied saves"
    m = model.load_pretrained(d, dtype=torch.float32)
    assert m.cfg.tie_word_embeddings == tied
    assert not m.training, "load_pretrained returns eval mode"
    assert all(p.dtype == torch.float32 for p in m.parameters())
    assert torch.equal(m.lm_head.weight, m.model.embed_tokens.weight) == tied
    ref = H.load_hf(d)
    # A real tie (one Parameter), not two Parameters over one storage: parameters() counts it once, like HF.
    assert sum(p.numel() for p in m.parameters()) == sum(p.numel() for p in ref.parameters())
    ids, pv, grid = case("two_images")
    with torch.no_grad():
        got = m(ids, pixel_values=pv, image_grid_thw=grid)
    assert_close("logits", got, H.hf_logits(ref, ids, pv, grid), ATOL)


def test_config_matches_tiny_preset(ckpts):
    preset = model.PRESETS["tiny"]
    for fmt in ("nested", "flat"):
        cfg = model.Config.from_json(os.path.join(ckpts[(False, fmt)], "config.json"))
        assert cfg == dataclasses.replace(preset, tie_word_embeddings=False), fmt
        assert model.Config.from_dict(cfg.to_dict()) == cfg
        tied = model.Config.from_json(os.path.join(ckpts[(True, fmt)], "config.json"))
        assert tied.tie_word_embeddings is True


@pytest.mark.parametrize("fmt", ["nested", "flat"])
def test_config_values_are_honoured(ckpts, tmp_path, fmt):
    """Non-default rms_norm_eps, rope_theta and mrope_section in config.json reach the math (both layouts).
    (At the real eps 1e-6 an ignored eps would hide below fp32 round-off; 0.05 makes it visible.)"""
    d = copy_ckpt(ckpts[(False, fmt)], tmp_path)

    def fn(cfg):
        t = cfg["text_config"] if fmt == "nested" else cfg
        t["rms_norm_eps"] = 0.05
        rope = t["rope_parameters"] if fmt == "nested" else t["rope_scaling"]
        rope["mrope_section"] = [4, 2, 2]
        if fmt == "nested":
            rope["rope_theta"] = 1e4
        else:
            t["rope_theta"] = 1e4
    edit_config(d, fn)
    m = model.load_pretrained(d, dtype=torch.float32)
    assert m.cfg.text.rms_norm_eps == 0.05 and m.cfg.text.rope_theta == 1e4
    assert tuple(m.cfg.text.mrope_section) == (4, 2, 2)
    ref = H.load_hf(d)
    ids, pv, grid = case("two_images")
    with torch.no_grad():
        got = m(ids, pixel_values=pv, image_grid_thw=grid)
    want = H.hf_logits(ref, ids, pv, grid)
    assert record("changed config vs default config", want, H.hf_logits(H.load_hf(ckpts[(False, fmt)]), ids, pv,
                                                                         grid)) > 1e-2, "edits must matter"
    assert_close("logits", got, want, ATOL)


def test_bf16_error_like_hf(base, ours, hf):
    """bf16 sanity: our bf16 logits are no further from the fp32 result than transformers' bf16 logits are from
    theirs (same precision policy); bf16 itself moves logits by ~0.15 here."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    hf16 = Qwen2_5_VLForConditionalGeneration.from_pretrained(base, dtype=torch.bfloat16,
                                                              attn_implementation="eager").eval()
    m16 = model.load_pretrained(base, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in m16.parameters())
    ids, pv, grid = case("one_image")
    with torch.no_grad():
        got16, got32 = m16(ids, pixel_values=pv, image_grid_thw=grid), ours(ids, pixel_values=pv, image_grid_thw=grid)
    assert got16.dtype == torch.float32, "forward returns fp32 logits"
    want16, want32 = H.hf_logits(hf16, ids, pv, grid), H.hf_logits(hf, ids, pv, grid)
    ours_err, hf_err = (got16 - got32).abs(), (want16 - want32).abs()
    record("ours bf16 vs fp32 (max)", got16, got32)
    record("HF bf16 vs fp32 (max)", want16, want32)
    record("ours vs HF, both bf16 (max)", got16, want16)
    assert ours_err.max() <= 2 * hf_err.max() and ours_err.mean() <= 1.5 * hf_err.mean(), \
        (ours_err.max().item(), hf_err.max().item(), ours_err.mean().item(), hf_err.mean().item())


# ---- KV cache ----

def greedy_cached(m, ids, pv, grid, mask, n_new):
    """Prefill then one-token decode steps with the static cache. -> tokens (B, n_new), logits (B, n_new, V)."""
    B, T = ids.shape
    m.setup_cache(B, T + n_new + 3)  # a few spare slots: unfilled slots must not be attended
    pos, delta = m.position_ids(ids, grid, mask)
    full_mask = None
    if mask is not None:  # over cache slots; slots not yet written are excluded by causality
        full_mask = torch.cat([mask, torch.ones(B, n_new + 3, dtype=mask.dtype)], 1)
    with torch.no_grad():
        h = m.decode(m.embed(ids, pixel_values=pv, image_grid_thw=grid), pos, attention_mask=full_mask,
                     input_pos=torch.arange(T))
        logits = [m.lm_head(h[:, -1]).float()]
        toks = []
        for i in range(n_new):
            toks.append(logits[-1].argmax(-1))
            if i == n_new - 1:
                break
            s = T + i  # padded-sequence index = cache slot
            p = (s + delta).view(1, B, 1).expand(3, B, 1)
            h = m.decode(m.embed(toks[-1][:, None]), p, attention_mask=full_mask, input_pos=torch.tensor([s]))
            logits.append(m.lm_head(h[:, -1]).float())
    m.clear_cache()
    return torch.stack(toks, 1), torch.stack(logits, 1)


def greedy_recompute(m, ids, pv, grid, mask, n_new):
    """The oracle: run the whole sequence through forward() at every step."""
    toks, logits = [], []
    seq, msk = ids, mask
    with torch.no_grad():
        for _ in range(n_new):
            last = m(seq, pixel_values=pv, image_grid_thw=grid, attention_mask=msk)[:, -1].float()
            logits.append(last)
            toks.append(last.argmax(-1))
            seq = torch.cat([seq, toks[-1][:, None]], 1)
            if msk is not None:
                msk = torch.cat([msk, torch.ones_like(msk[:, :1])], 1)
    return torch.stack(toks, 1), torch.stack(logits, 1)


N_NEW = 6


def test_kv_cache_single_prompt(ours, hf):
    ids, pv, grid = case("one_image")
    toks, logits = greedy_cached(ours, ids, pv, grid, None, N_NEW)
    ref_toks, ref_logits = greedy_recompute(ours, ids, pv, grid, None, N_NEW)
    assert toks.tolist() == ref_toks.tolist()
    assert_close("cached vs recompute logits", logits, ref_logits, ATOL)
    # HF generate (its own cache + rope_deltas) on the same prompt.
    hf.model.rope_deltas = None
    out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pv, image_grid_thw=grid,
                      mm_token_type_ids=H.mm_token_type_ids(ids), max_new_tokens=N_NEW, do_sample=False,
                      eos_token_id=None, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    hf.model.rope_deltas = None
    assert out.sequences[0, ids.shape[1]:].tolist() == toks[0].tolist()
    assert_close("cached vs HF generate logits", logits, torch.stack(out.logits, 1).float(), ATOL)


def test_kv_cache_left_padded_batch(ours):
    ids, mask, pv, grid, seqs, pv_rows, grid_rows = left_padded_batch()
    toks, logits = greedy_cached(ours, ids, pv, grid, mask, N_NEW)
    ref_toks, ref_logits = greedy_recompute(ours, ids, pv, grid, mask, N_NEW)
    assert toks.tolist() == ref_toks.tolist()
    assert_close("cached vs recompute logits", logits, ref_logits, ATOL)
    # Each row alone, unpadded: padding must change nothing.
    for b in range(2):
        alone_toks, alone_logits = greedy_cached(ours, seqs[b][None], pv_rows[b], grid_rows[b], None, N_NEW)
        assert alone_toks[0].tolist() == toks[b].tolist()
        assert_close("padded batch vs row alone", logits[b], alone_logits[0], ATOL)


# ---- saving ----

@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_save_pretrained_loads_in_hf(ckpts, tmp_path, tied, sharded):
    m = model.load_pretrained(ckpts[(tied, "nested")], dtype=torch.float32)
    out = str(tmp_path / "saved")
    if sharded:
        model.save_pretrained(m, out, max_shard_bytes=100_000)
        index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
        files = set(index["weight_map"].values())
        assert len(files) > 1 and all(os.path.exists(os.path.join(out, f)) for f in files)
    else:
        model.save_pretrained(m, out)
        assert os.path.exists(os.path.join(out, "model.safetensors"))
    written = set()
    for f in os.listdir(out):
        if f.endswith(".safetensors"):
            written |= set(load_file(os.path.join(out, f)))
    hub_names = set(m.state_dict()) - ({"lm_head.weight"} if tied else set())
    assert written == hub_names, "saves use the hub names (visual.*, model.*, lm_head.weight); tied saves drop lm_head"
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert "text_config" not in cfg and cfg["hidden_size"] == 64 and "vision_config" in cfg, "hub-style flat config"
    ref = H.load_hf(out)
    ids, pv, grid = case("two_images")
    with torch.no_grad():
        got = m(ids, pixel_values=pv, image_grid_thw=grid)
    assert_close("logits", got, H.hf_logits(ref, ids, pv, grid), ATOL)
    again = model.load_pretrained(out, dtype=torch.float32)
    sd, sd2 = m.state_dict(), again.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)


# ---- loading errors ----

def copy_ckpt(src, tmp_path):
    dst = str(tmp_path / "ckpt")
    shutil.copytree(src, dst)
    return dst


def edit_weights(d, fn):
    path = os.path.join(d, "model.safetensors")
    sd = load_file(path)
    fn(sd)
    save_file(sd, path, metadata={"format": "pt"})


def edit_config(d, fn):
    path = os.path.join(d, "config.json")
    cfg = json.load(open(path))
    fn(cfg)
    json.dump(cfg, open(path, "w"))


def load_error(d):
    with pytest.raises(Exception) as ei:
        model.load_pretrained(d, dtype=torch.float32)
    assert not isinstance(ei.value, AssertionError), "use a real exception, not assert"
    return str(ei.value)


def test_load_missing_and_unexpected_keys_in_one_error(base, tmp_path):
    d = copy_ckpt(base, tmp_path)
    missing = ["model.layers.1.mlp.up_proj.weight", "visual.blocks.2.attn.qkv.bias"]
    extra = ["model.layers.7.mlp.up_proj.weight", "visual.merger.bogus.weight"]

    def fn(sd):
        for k in missing:
            del sd[k]
        for k in extra:
            sd[k] = torch.zeros(3)
    edit_weights(d, fn)
    msg = load_error(d)
    for k in missing + extra:
        assert k in msg, f"{k} not named in: {msg}"


@pytest.mark.parametrize("kind", ["missing", "unexpected", "shape"])
def test_load_key_errors(base, tmp_path, kind):
    d = copy_ckpt(base, tmp_path)
    key = {"missing": "model.layers.0.self_attn.k_proj.bias", "unexpected": "model.layers.0.self_attn.rotary.inv_freq",
           "shape": "visual.merger.mlp.2.weight"}[kind]

    def fn(sd):
        if kind == "missing":
            del sd[key]
        elif kind == "unexpected":
            sd[key] = torch.ones(8)
        else:
            sd[key] = sd[key][:, :-1].contiguous()
    edit_weights(d, fn)
    msg = load_error(d)
    assert key in msg, msg


def test_load_missing_shard(ckpts, tmp_path):
    d = copy_ckpt(ckpts[(False, "sharded")], tmp_path)
    shard = sorted(set(json.load(open(os.path.join(d, "model.safetensors.index.json")))["weight_map"].values()))[2]
    os.remove(os.path.join(d, shard))
    msg = load_error(d)
    assert shard in msg, msg


def _set(path, value):
    def fn(cfg):
        node = cfg
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value
    return fn


CONFIG_ERRORS = {  # (checkpoint format, edit, key that must be named in the error)
    "sliding_window_flat": ("flat", _set(["use_sliding_window"], True), "use_sliding_window"),
    "sliding_window_nested": ("nested", _set(["text_config", "use_sliding_window"], True), "use_sliding_window"),
    "rope_yarn_flat": ("flat", _set(["rope_scaling"], {"type": "yarn", "factor": 4.0, "mrope_section": [2, 3, 3]}),
                       "rope"),
    "rope_linear_nested": ("nested", _set(["text_config", "rope_parameters"],
                                          {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6,
                                           "mrope_section": [2, 3, 3]}), "rope"),
    "hidden_act_nested": ("nested", _set(["text_config", "hidden_act"], "gelu_pytorch_tanh"), "hidden_act"),
    "hidden_act_flat": ("flat", _set(["hidden_act"], "relu"), "hidden_act"),
    "mrope_section_sum": ("flat", _set(["rope_scaling"], {"type": "mrope", "mrope_section": [2, 3, 4]}),
                          "mrope_section"),
}


@pytest.mark.parametrize("name", list(CONFIG_ERRORS))
def test_load_unsupported_config(ckpts, tmp_path, name):
    fmt, fn, key = CONFIG_ERRORS[name]
    d = copy_ckpt(ckpts[(False, fmt)], tmp_path)
    edit_config(d, fn)
    msg = load_error(d)
    assert "config.json" in msg and key in msg, msg


def test_config_transformers_45x_layout(base, hf, tmp_path):
    """A folder re-saved by transformers 4.53-4.57 has "image_token_id": null inside text_config: the ids must come
    from the top level (else every image crashes in embed), and logits must match transformers."""
    d = copy_ckpt(base, tmp_path)
    path = os.path.join(d, "config.json")
    json.dump(H.transformers_45x_config(json.load(open(path))), open(path, "w"))
    raw = json.load(open(path))
    assert raw["text_config"]["image_token_id"] is None and raw["image_token_id"] == H.IMG
    m = model.load_pretrained(d, dtype=torch.float32)
    assert (m.cfg.image_token_id, m.cfg.video_token_id) == (H.IMG, 656)
    assert (m.cfg.vision_start_token_id, m.cfg.vision_end_token_id) == (H.VS, H.VE)
    ids, pv, grid = case("two_images")
    with torch.no_grad():
        got = m(ids, pixel_values=pv, image_grid_thw=grid)
    assert_close("logits", got, H.hf_logits(hf, ids, pv, grid), ATOL)
    # null at both levels (or a non-integer) is an error naming the file and the key
    edit_config(d, _set(["image_token_id"], None))
    msg = load_error(d)
    assert "config.json" in msg and "image_token_id" in msg, msg
    edit_config(d, _set(["image_token_id"], "655"))
    assert "image_token_id" in load_error(d)


# ---- transformers' in-memory names ----

def test_load_transformers_in_memory_names(base, ours, hf, tmp_path):
    d = copy_ckpt(base, tmp_path)

    def rename(sd):
        for k in list(sd):
            if k.startswith("visual."):
                sd["model." + k] = sd.pop(k)
            elif k.startswith("model."):
                sd["model.language_model." + k[len("model."):]] = sd.pop(k)
        assert any(k.startswith("model.language_model.layers.") for k in sd)
        assert any(k.startswith("model.visual.blocks.") for k in sd)
    edit_weights(d, rename)
    m = model.load_pretrained(d, dtype=torch.float32)
    sd, ref = m.state_dict(), ours.state_dict()
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in sd)
    ids, pv, grid = case("one_image")
    with torch.no_grad():
        got = m(ids, pixel_values=pv, image_grid_thw=grid)
    assert_close("logits", got, H.hf_logits(hf, ids, pv, grid), ATOL)
