"""CUDA-only checks (`make gpu`; skipped without a GPU): bf16 parity with transformers on the 3b/7b shapes at reduced
depth, the chunked loss in bf16, and train.py end to end on CUDA (autocast one-GPU path and FSDP2 bf16 units under
torchrun, activation checkpointing and compile on by default, sharded resume, bf16 export).

    make gpu                                          # these tests + bench.py --train rows, < 10 min on one H100
    .venv/bin/python -m pytest -q tests/test_gpu.py
"""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import bench
import model
import prepare
import train

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def reduced(name, layers=2, vision_depth=4):
    """A preset's widths (heads, vocab, ViT) with a shallow decoder and ViT: the real shapes, in seconds."""
    cfg = model.PRESETS[name]
    vision = dataclasses.replace(cfg.vision, depth=vision_depth, fullatt_block_indexes=(1, 3))
    return dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, num_hidden_layers=layers), vision=vision)


@pytest.mark.parametrize("name", ["3b", "7b"])
def test_bf16_logits_match_transformers(name, tmp_path):
    """Same random weights, same bf16 inputs: our logits against transformers' (sdpa) at bf16 tolerance."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    cfg, dev = reduced(name), torch.device("cuda")
    ours = bench.build_ours(cfg, torch.bfloat16, dev, seed=0)
    model.save_pretrained(ours, tmp_path)
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.bfloat16,
                                                            attn_implementation="sdpa").to(dev).eval()
    opts = bench.Options(config=name, prompt_len=256, image_size=448)
    ids, pv, grid, _ = bench.make_inputs(cfg, opts, dev)
    with torch.no_grad():
        a = ours(ids, pixel_values=pv, image_grid_thw=grid).float()
        b = hf(input_ids=ids, pixel_values=pv, image_grid_thw=grid,
               mm_token_type_ids=(ids == cfg.image_token_id).long()).logits.float()
    cos = F.cosine_similarity(a.flatten(0, 1), b.flatten(0, 1), dim=-1)
    assert cos.min() > 0.99, cos.min()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.95


def test_chunked_loss_bf16_matches_fp32_cross_entropy():
    torch.manual_seed(0)
    N, D, V = 3000, 512, 152064
    h = torch.randn(N, D, device="cuda", dtype=torch.bfloat16)
    head = torch.nn.Linear(D, V, bias=False, device="cuda", dtype=torch.bfloat16)
    tgt = torch.randint(0, V, (N,), device="cuda")
    pos = torch.arange(N, device="cuda")
    ours = train.lm_loss_sum(head, h, pos, tgt)                  # 3 chunks of 1024
    full = F.cross_entropy(head(h).float(), tgt, reduction="sum")
    torch.testing.assert_close(ours, full, rtol=1e-5, atol=1e-2)


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn")
    prepare.main(["synthetic", "--out", str(out), "--n", "32", "--seed", "12345"])
    return out


def train_args(syn, out, *extra):
    return ["--data", str(syn / "prepared"), "--model", str(syn / "model"), "--out", str(out), "--global-batch", "4",
            "--micro-batch", "1", "--lr", "2e-3", "--head-lr", "2e-3", "--epochs", "2", "--device", "cuda", *extra]


def test_train_one_gpu_learns_and_exports_bf16(syn, tmp_path):
    """One process on CUDA: bf16 autocast, activation checkpointing and compile on by default; the loss falls, the
    export is bf16 and sample.py loads it."""
    import sample
    cfg = train.parse_args(train_args(syn, tmp_path / "run", "--tau", "1.0", "--epochs", "4"))
    train.main(cfg)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["lm_loss"] < rows[0]["lm_loss"] - 0.3 and rows[-1]["peak_mem_gib"] > 0
    w = load_file(tmp_path / "run" / "model.safetensors")
    assert all(v.dtype == torch.bfloat16 for v in w.values())
    bundle = sample.load(tmp_path / "run", device="cuda")
    assert bundle is not None


def test_fsdp_bf16_units_under_torchrun_resume(syn, tmp_path):
    """`torchrun train.py --fsdp` on one GPU (NCCL): bf16 MixedPrecisionPolicy units, stop + --resume from the
    sharded checkpoint; the resumed run's losses follow the uninterrupted one's (CUDA kernels are not bit-exact)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
              str(ROOT / "train.py")]
    for out, extra in (("a", []), ("b", ["--stop-after", "3"]), ("b", ["--resume"])):
        # --no-compile: compilation is covered above, and three compiled launches would take minutes
        r = subprocess.run(launch + train_args(syn, tmp_path / out, "--fsdp", "--no-compile", *extra), env=env,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
    la = [json.loads(x)["lm_loss"] for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["lm_loss"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert len(la) == len(lb) and la == pytest.approx(lb, rel=2e-2)
