"""Tests for the fast generation paths: attention forms against the masked SDPA reference on left-padded batches,
the ViT on mixed image sizes, the compiled decode step against eager, prefill-once sampling, and torchrun sharding of
eval / score against one process. CPU, tiny random model.
    .venv/bin/python -m pytest -q tests/test_generate.py
"""
import torch
import pytest

import model
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
    plan = lambda am, T, S, pos, L=None: model.attention_plan(am, T, S, pos, L, dev, f32).kind
    ids, mask = left_padded(model.PRESETS["tiny"])
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
    pre = [model.preprocess_image(i) for i in imgs]
    pv, grid = torch.cat([p for p, _ in pre]), torch.cat([g for _, g in pre])
    together = m.visual(pv, grid)
    alone = torch.cat([m.visual(p, g) for p, g in pre])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


# ---- generation: every mode against the naive oracle, compiled == eager, prefill once for N samples ----

import sample                                                                  # noqa: E402
from test_sample import N, Q_A, Q_B, STEPS, tiny_folder                        # noqa: E402


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("generate"))


@pytest.mark.parametrize("kind,mode", [("pca", "zero"), ("full", "full")])
def test_cached_matches_naive_remaining_modes(root, kind, mode):
    # test_sample covers pca, raw and noise; these are the other two
    b = sample.load(tiny_folder(root, kind))
    img = image(56, 56, 1)
    got = sample.generate(b, [img], [Q_A], mode=mode, max_new_tokens=STEPS, debug=True)[0]
    ref = sample.generate_naive(b, img, Q_A, mode=mode, max_new_tokens=STEPS, debug=True)
    assert got["token_ids"] == ref["token_ids"] and got["text"] == ref["text"]
    assert (mode == "zero") == (got["latent_spans"] == [])
    torch.testing.assert_close(got["hidden"], ref["hidden"], atol=1e-4, rtol=1e-4)


def test_compiled_step_equals_eager(root):
    """torch.compile(fullgraph=True) of the decode step (aot_eager: graph capture and functionalisation without a C
    compiler; inductor on CPU takes ~60 s to compile, over this suite's budget) against the eager step. A 336x392
    image puts the prompt at 248 tokens, so the steps cross the 256-slot bucket: kv_len changes mid-run."""
    b = sample.load(tiny_folder(root, "pca"))
    imgs, qs = [image(392, 336, 1), image(84, 56, 2)], [Q_A, Q_B]
    kw = dict(mode="pca", max_new_tokens=STEPS, debug=True, temperature=1.0, seed=5)
    eager = sample.generate(b, imgs, qs, compile=False, **kw)
    compiled = sample.generate(b, imgs, qs, compile="aot_eager", **kw)
    assert sample.get_trunk(b, "aot_eager").compiled, "the compiled step fell back to eager"
    for e, c in zip(eager, compiled):
        assert e["token_ids"] == c["token_ids"]
        torch.testing.assert_close(c["hidden"], e["hidden"], atol=1e-5, rtol=1e-5)
    T0 = len(sample.encode_prompts(b, imgs, qs)[0][0])
    assert T0 < 256 < T0 + eager[0]["n_generated"], T0                          # the bucket boundary was crossed


def test_n_samples_prefill_once_equals_repeated_prompts(root):
    b = sample.load(tiny_folder(root, "pca"))
    kw = dict(mode="pca", max_new_tokens=STEPS, temperature=1.0, top_p=0.9, seed=7, debug=True)
    imgs, qs = [image(56, 56, 1), image(84, 56, 2)], [Q_A, Q_B]
    once = sample.generate(b, imgs, qs, n_samples=3, **kw)
    repeated = sample.generate(b, [i for i in imgs for _ in range(3)], [q for q in qs for _ in range(3)], **kw)
    assert len(once) == 6
    for o, r in zip(once, repeated):
        assert o["token_ids"] == r["token_ids"]
        torch.testing.assert_close(o["hidden"], r["hidden"], atol=1e-5, rtol=1e-5)
    assert len({tuple(o["token_ids"]) for o in once[:3]}) > 1                   # the samples really differ


# ---- torchrun: 2 gloo ranks write the files one process writes ----

import json                                                                    # noqa: E402
import os                                                                      # noqa: E402
import re                                                                      # noqa: E402
import subprocess                                                              # noqa: E402
import sys                                                                     # noqa: E402
from pathlib import Path                                                       # noqa: E402

import eval as gapeval                                                         # noqa: E402
import prepare                                                                 # noqa: E402
from test_eval import folder, jsonl                                            # noqa: E402,F401  (fixtures)

ROOT = Path(__file__).resolve().parents[1]


def torchrun(tmp_path, *argvs, nproc=2):
    """Each argv list (eval.py's, or prepare.py's starting with "score") run in turn by every rank of one torchrun:
    one launch, so the 2 cores pay for importing torch once per rank."""
    driver = tmp_path / "driver.py"
    driver.write_text(f"import sys\nsys.path.insert(0, {str(ROOT)!r})\nimport eval, prepare\n"
                      + "".join(f"{'prepare' if a[0] == 'score' else 'eval'}.main({a!r})\n" for a in argvs)
                      + "import torch.distributed as dist\ndist.destroy_process_group()\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(driver)]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def without_timing(text):
    """Wall-clock fields differ between any two runs, one process or many; everything else must not."""
    text = re.sub(r'"latency_s": [-0-9.e]+', '"latency_s": 0', text)
    return re.sub(r'"(mean|p50|p90|samples_per_s)": [-0-9.e]+', r'"\1": 0', text)


def test_torchrun_eval_and_score_equal_one_process(folder, jsonl, tmp_path):
    common = ["--model", str(folder), "--data", str(jsonl), "--modes", "pca,zero", "--latents", "2",
              "--batch-size", "2", "--max-new-tokens", "6", "--temperature", "1.0", "--device", "cpu"]
    score = ["score", "--model", str(folder), "--data", str(jsonl), "--samples", "3", "--max-new-tokens", "4",
             "--device", "cpu"]
    gapeval.main(common + ["--out", str(tmp_path / "one")])
    prepare.main(score + ["--out", str(tmp_path / "one.jsonl")])
    torchrun(tmp_path, common + ["--out", str(tmp_path / "two")], score + ["--out", str(tmp_path / "two.jsonl")])

    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "two").iterdir())         # no part files left over
    assert "predictions-pca-3.jsonl" in names and "results.json" in names
    for name in names:
        one, two = (without_timing((tmp_path / d / name).read_text()) for d in ("one", "two"))
        assert one == two.replace(str(tmp_path / "two"), str(tmp_path / "one")), name
    assert (tmp_path / "one.jsonl").read_bytes() == (tmp_path / "two.jsonl").read_bytes()
    assert [json.loads(l)["id"] for l in (tmp_path / "two.jsonl").read_text().splitlines()] == ["r0", "r1", "r2"]
    assert not list(tmp_path.glob("two.jsonl.part*"))


def test_eval_resumes_from_part_files(folder, jsonl, tmp_path, monkeypatch):
    """A crash leaves part files: the rerun generates only the batches no part holds, and the merged file is the
    uninterrupted run's."""
    argv = ["--model", str(folder), "--data", str(jsonl), "--modes", "zero", "--batch-size", "1",
            "--max-new-tokens", "5", "--temperature", "1.0", "--device", "cpu", "--out", str(tmp_path)]
    gapeval.main(argv)
    path = tmp_path / "predictions-zero-0.jsonl"
    full = path.read_text().splitlines()
    path.unlink()
    (tmp_path / (path.name + ".part0")).write_text(full[0] + "\n" + full[2][:30])   # r0 done, r2 torn
    seeds = []
    real = sample.generate
    monkeypatch.setattr(sample, "generate", lambda *a, **k: seeds.append(k.get("seed")) or real(*a, **k))
    gapeval.main(argv)
    assert seeds[1:] == [1, 2]                     # after the warm-up: r1 and r2 (seed + batch start) only
    assert without_timing(path.read_text()) == without_timing("\n".join(full) + "\n")
    assert not list(tmp_path.glob("*.part*"))
