"""CUDA checks of the fast generation paths (skipped without a GPU): which SDPA kernel each attention form
dispatches to, and the compiled, CUDA-graphed decode step against the eager one.
    .venv/bin/python -m pytest -q -s tests/test_gpu_generate.py      # -s prints the kernel table
"""
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import model
import sample
from test_sample import Q_A, Q_B, STEPS, image, tiny_folder

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SDPA_OPS = {"aten::_scaled_dot_product_flash_attention": "flash",
            "aten::_scaled_dot_product_efficient_attention": "memory-efficient",
            "aten::_scaled_dot_product_cudnn_attention": "cudnn",
            "aten::_scaled_dot_product_attention_math": "math",
            "aten::_scaled_dot_product_flash_attention_for_cpu": "cpu flash"}


def kernels(fn):
    """The SDPA backends fn() dispatched to, by the aten op each call ran."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
        torch.cuda.synchronize()
    return sorted({SDPA_OPS[e.name] for e in prof.events() if e.name in SDPA_OPS})


@pytest.fixture(scope="module")
def m():
    # the small preset's shapes (head_dim 64, GQA 4:1; ViT head_dim 80), two layers, bf16 on the GPU
    cfg = model.PRESETS["small"]
    cfg = model.Config(text=model.TextConfig(**{**cfg.text.__dict__, "num_hidden_layers": 2}),
                       vision=model.VisionConfig(**{**cfg.vision.__dict__, "depth": 2, "fullatt_block_indexes": (1,)}))
    with torch.device("cuda"):
        mm = model.Qwen25VL(cfg).to(torch.bfloat16).eval()
    return mm


@torch.no_grad()
def test_attention_forms_dispatch_to_fused_kernels(m):
    dev, B, T = torch.device("cuda"), 3, 300
    ids = torch.randint(0, 1000, (B, T), device=dev)
    mask = torch.ones(B, T, dtype=torch.long, device=dev)
    mask[0, :40], mask[2, :7] = 0, 0                                            # left pads
    S = sample.kv_bucket(T + 8)
    cache_mask = torch.cat([mask, torch.ones(B, S - T, dtype=mask.dtype, device=dev)], 1)
    pos, delta = m.position_ids(ids, None, mask)
    x = m.embed(ids)
    m.setup_cache(B, S)
    p1 = (T + delta).view(1, B, 1).expand(3, B, 1)
    calls = {
        "prefill, no padding (causal)": lambda: m.decode(x, pos),
        "prefill, left-padded (rows)": lambda: m.decode(x, pos, cache_mask, input_pos=torch.arange(T, device=dev)),
        "decode step (GQA folded)": lambda: m.decode(x[:, :1], p1, cache_mask, input_pos=torch.tensor([T], device=dev),
                                                     kv_len=sample.kv_bucket(T + 1)),
    }
    pv, grid = zip(*(model.preprocess_image(image(w, h, s)) for w, h, s in ((448, 336, 1), (196, 280, 2))))
    calls["ViT, two image sizes"] = lambda: m.visual(torch.cat(pv).to(dev), torch.cat(grid))
    seen = {name: kernels(fn) for name, fn in calls.items()}
    m.clear_cache()
    print("\nSDPA backend per attention form (bf16, " + torch.cuda.get_device_name() + "):")
    for name, ks in seen.items():
        print(f"  {name:32s} {', '.join(ks)}")
    for name, ks in seen.items():
        assert ks and "math" not in ks, f"{name}: dispatched to {ks}"
    assert seen["prefill, no padding (causal)"] == ["flash"]                   # enable_gqa is flash-only


def test_compiled_cuda_graph_step_equals_eager(tmp_path):
    b = sample.load(tiny_folder(str(tmp_path), "pca"), device="cuda")
    imgs, qs = [image(392, 336, 1), image(84, 56, 2)], [Q_A, Q_B]             # the first prompt crosses 256 slots
    kw = dict(mode="pca", max_new_tokens=STEPS, debug=True)
    eager = sample.generate(b, imgs, qs, compile=False, **kw)
    compiled = [sample.generate(b, imgs, qs, compile=True, **kw) for _ in range(2)]   # 2nd: graph replays
    assert sample.get_trunk(b, True).compiled, "the compiled step fell back to eager"
    for run in compiled:
        for e, c in zip(eager, run):
            assert e["token_ids"] == c["token_ids"]
            torch.testing.assert_close(c["hidden"], e["hidden"], atol=1e-4, rtol=1e-4)
