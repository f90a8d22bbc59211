"""Smoke test for bench.py: the tiny config, one iteration, ours and transformers, no timing asserts (speed is
reported by bench.py, never asserted).

    .venv/bin/python -m pytest -q tests/test_bench.py
"""
import math

import pytest

import bench


def finite_positive(x):
    return math.isfinite(x) and x > 0


def test_bench_tiny_runs():
    opts = bench.Options(config="tiny", device="cpu", prompt_len=8, image_size=56, decode_steps=3, iters=1, batch=2)
    res = bench.main(opts)
    for row in ("forward", "prefill", "decode", "latent_step", "generate"):
        assert finite_positive(res[row]["ours_ms"]) and finite_positive(res[row]["ours_tok_s"]), res[row]
    assert res["generate"]["ours_tok_s"] == pytest.approx(2 * 3 * 1e3 / res["generate"]["ours_ms"])   # B * n tokens
    for row in ("forward", "prefill", "decode", "generate"):   # rows with a transformers counterpart
        assert finite_positive(res[row]["hf_ms"]) and finite_positive(res[row]["ratio"]), res[row]
    assert finite_positive(res["latent_vs_decode"])
    assert res["max_logit_diff"] < 1e-4                  # the same random weights really are in both models
    assert res["tokens_match"] == 1.0                    # and our generation step picks HF's greedy tokens


def test_bench_train_step_tiny_runs():
    """bench.py --train on CPU: train.py's loss through our model and the same step through transformers."""
    opts = bench.Options(config="tiny", device="cpu", prompt_len=8, image_size=56, iters=1, train=True, layers=1)
    res = bench.train_main(opts)
    assert res["layers"] == 1 and res["tokens"] == 8 + 2 + 4   # text + vision start/end + 4 image tokens
    for row in ("ours", "transformers"):
        assert finite_positive(res[row]["ms"]) and finite_positive(res[row]["tok_s"]), res[row]
    assert finite_positive(res["ratio"])
