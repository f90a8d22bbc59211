"""Tiny random transformers Qwen2.5-VL checkpoints: the oracle for tests/test_model.py.

Builds `Qwen2_5_VLForConditionalGeneration` with a config matching model.PRESETS["tiny"], re-initialises
every tensor (std 0.15, norm weights 1 +/- 0.15, biases std 0.15 -- the default 0.02 makes a tiny model
almost linear and hides bugs) and writes it with save_pretrained as real
safetensors. Options: tied/untied lm_head, flat (hub-style) or nested (transformers-5 save) config.json,
sharded save with model.safetensors.index.json.

    .venv/bin/python -m pytest -q tests/test_model.py     # uses these helpers through fixtures
"""
import json
import os

import numpy as np
import torch
from PIL import Image

# ---- tiny config (mirrors model.PRESETS["tiny"]) ----

TEXT = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=128000, hidden_act="silu",
            bos_token_id=643, eos_token_id=645)
ROPE_THETA = 1e6
MROPE_SECTION = [2, 3, 3]  # sums to head_dim/2 = 64/4/2
VISION = dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3, patch_size=14,
              temporal_patch_size=2, spatial_merge_size=2, window_size=112, fullatt_block_indexes=[1, 3],
              out_hidden_size=64, hidden_act="silu", tokens_per_second=2)
IDS = dict(image_token_id=655, video_token_id=656, vision_start_token_id=652, vision_end_token_id=653)
BOS, EOS = 643, 645
VS, VE, IMG = 652, 653, 655
STD = 0.15


def quiet():
    """No progress bars from transformers' save/load in test output."""
    from transformers.utils import logging
    logging.disable_progress_bar()


def hf_config(tie=False):
    from transformers import Qwen2_5_VLConfig
    text = dict(TEXT, rope_parameters={"rope_type": "default", "mrope_section": list(MROPE_SECTION),
                                       "rope_theta": ROPE_THETA})
    return Qwen2_5_VLConfig(text_config=text, vision_config=dict(VISION), tie_word_embeddings=tie, **IDS)


@torch.no_grad()
def randomize_(model, seed=0, std=STD):
    """Re-initialise every parameter: norm weights ~ 1 + N(0, std), everything else (weights and biases) ~ N(0, std).
    The patch embedding (fan-in 1176) gets std 0.03 so its output is O(1): at std 0.15 the ViT residual stream reaches
    ~200 and plain fp32 rounding (SDPA vs eager) alone is ~1e-5, which would blur the 1e-5 parity threshold."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        s = 0.03 if "patch_embed" in name else std
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32) * s
        is_norm = p.ndim == 1 and ("norm" in name or "ln_q" in name)
        p.copy_(1.0 + noise if is_norm else noise)
    return model


def build_hf(tie=False, seed=0):
    """A fresh random tiny HF model in fp32, eager attention, eval mode."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    quiet()
    cfg = hf_config(tie)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    m = Qwen2_5_VLForConditionalGeneration(cfg).to(torch.float32).eval()
    randomize_(m, seed)
    if tie:
        m.tie_weights()
        assert m.lm_head.weight.data_ptr() == m.model.language_model.embed_tokens.weight.data_ptr()
    return m


def flat_config(nested):
    """Rewrite a transformers-5 nested config.json dict into the hub's flat layout (text keys at
    the top level, a nested vision_config), as in Qwen/Qwen2.5-VL-7B-Instruct's config.json."""
    t, v = nested["text_config"], nested["vision_config"]
    rp = t["rope_parameters"]
    flat = {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "attention_dropout": 0.0,
        "bos_token_id": t["bos_token_id"], "eos_token_id": t["eos_token_id"],
        "vision_start_token_id": nested["vision_start_token_id"], "vision_end_token_id": nested["vision_end_token_id"],
        "vision_token_id": 654, "image_token_id": nested["image_token_id"], "video_token_id": nested["video_token_id"],
        "hidden_act": t["hidden_act"], "hidden_size": t["hidden_size"], "initializer_range": 0.02,
        "intermediate_size": t["intermediate_size"], "max_position_embeddings": t["max_position_embeddings"],
        "max_window_layers": t["num_hidden_layers"], "num_attention_heads": t["num_attention_heads"],
        "num_hidden_layers": t["num_hidden_layers"], "num_key_value_heads": t["num_key_value_heads"],
        "rms_norm_eps": t["rms_norm_eps"], "rope_theta": rp["rope_theta"], "sliding_window": 32768,
        "tie_word_embeddings": nested["tie_word_embeddings"], "torch_dtype": "float32",
        "transformers_version": "4.41.2", "use_cache": True, "use_sliding_window": False,
        "vision_config": {
            "depth": v["depth"], "hidden_act": v["hidden_act"], "intermediate_size": v["intermediate_size"],
            "hidden_size": v["hidden_size"], "out_hidden_size": v["out_hidden_size"], "num_heads": v["num_heads"],
            "in_chans": v["in_channels"], "fullatt_block_indexes": list(v["fullatt_block_indexes"]),
            "patch_size": v["patch_size"], "spatial_patch_size": v["patch_size"],
            "spatial_merge_size": v["spatial_merge_size"], "temporal_patch_size": v["temporal_patch_size"],
            "window_size": v["window_size"], "tokens_per_second": v["tokens_per_second"],
        },
        "rope_scaling": {"type": "mrope", "mrope_section": list(rp["mrope_section"])},
        "vocab_size": t["vocab_size"],
    }
    return flat


def transformers_45x_config(nested):
    """The layout transformers 4.53-4.57 write when they re-save a Qwen2.5-VL: the text keys both at the top level
    and inside text_config, where the multimodal token ids are null ("image_token_id": null, ...), the real ids
    only at the top level, `rope_scaling` with rope_type "default", a vision_config with both in_chans and
    in_channels. Every fine-tune saved with those versions looks like this."""
    flat = flat_config(nested)
    flat["rope_scaling"] = {"mrope_section": flat["rope_scaling"]["mrope_section"], "rope_type": "default",
                            "type": "default"}
    text = {k: v for k, v in flat.items() if k not in ("vision_config", "tie_word_embeddings", "transformers_version")}
    text.update(model_type="qwen2_5_vl_text", image_token_id=None, video_token_id=None, sliding_window=None,
                layer_types=["full_attention"] * flat["num_hidden_layers"], dtype="float32")
    out = dict(flat, text_config=text, transformers_version="4.56.1", dtype="float32")
    out["vision_config"] = dict(flat["vision_config"], in_channels=flat["vision_config"]["in_chans"],
                                model_type="qwen2_5_vl", initializer_range=0.02, dtype="float32")
    return out


def save_hf(model, path, flat=False, max_shard_size=None):
    """save_pretrained into `path` (safetensors; sharded when max_shard_size is given); optionally flatten config.json."""
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **kw)
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
        nested = json.load(f)
    assert "text_config" in nested and "vision_config" in nested, "expected a transformers-5 nested config"
    if flat:
        with open(cfg_path, "w") as f:
            json.dump(flat_config(nested), f, indent=2)
    return path


def load_hf(path):
    from transformers import Qwen2_5_VLForConditionalGeneration
    quiet()
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager").eval()


# ---- inputs ----

def random_pixels(grid, seed=0):
    """Random normalised-looking pixel_values for grids [(t,h,w), ...]: (sum t*h*w, 1176) fp32, grid (n,3) long."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.tensor(grid, dtype=torch.long)
    n = int(grid.prod(-1).sum())
    return torch.randn(n, 3 * 2 * 14 * 14, generator=g), grid


def n_tokens(grid_row):
    t, h, w = (int(x) for x in grid_row)
    return t * h * w // 4


def image_block(grid_row):
    return [VS] + [IMG] * n_tokens(grid_row) + [VE]


def text_ids(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 640, (n,), generator=g).tolist()  # plain BPE range, below the specials at 643+


def mm_token_type_ids(input_ids):
    return (input_ids == IMG).long()


def hf_logits(hf, input_ids, pixel_values=None, image_grid_thw=None, attention_mask=None):
    kw = {}
    if pixel_values is not None:
        kw = dict(pixel_values=pixel_values, image_grid_thw=image_grid_thw,
                  mm_token_type_ids=mm_token_type_ids(input_ids))
    hf.model.rope_deltas = None  # HF keeps state between calls; start clean
    with torch.no_grad():
        out = hf(input_ids=input_ids, attention_mask=attention_mask, **kw)
    hf.model.rope_deltas = None
    return out.logits.float()


def pil_image(h, w, mode="RGB", seed=0):
    """A smooth-ish random image so bicubic resizing is non-trivial: noise + gradients."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = (127 + 100 * np.sin(yy / 7.0)[..., None] * np.cos(xx / 5.0)[..., None]
            + rng.normal(0, 40, (h, w, 1)))
    chans = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = np.clip(base + rng.normal(0, 30, (h, w, chans)), 0, 255).astype(np.uint8)
    if mode == "RGBA":
        arr[..., 3] = rng.integers(0, 256, (h, w), dtype=np.uint8)  # varied alpha: exercises white compositing
    if mode == "L":
        arr = arr[..., 0]
    img = Image.fromarray(arr)
    assert img.mode == mode
    return img
