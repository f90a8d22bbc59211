"""Tests for sample.py: the cached, batched text/latent loop against the naive recompute-everything oracle, on a tiny
random Qwen2.5-VL (std 0.1), a tiny byte-level tokenizer in Qwen's id layout and a PCA basis fitted on random
vectors. CPU, seconds.
    .venv/bin/python -m pytest -q tests/test_sample.py

Forcing a span: a random model essentially never picks <|latent_start|>. We set its lm_head row to a multiple of
h̄_A^perp, the part of row A's last prompt state orthogonal to row B's: its logit is then large for row A (A opens a
span at the first step) and exactly 0 for row B (B keeps writing text), so one batch holds a row in latent mode
and a row in text mode at the same step.
"""
import json
import sys
from functools import lru_cache
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

import latent_head
import model
import prepare
import sample

N = 3          # latents per span: small, so the tests stay fast and spans close within the token budget
STEPS = 14     # max_new_tokens in most tests
Q_A, Q_B = "How many red squares?", "Is it blue?"

# ---- builders (plain functions, cached; test_eval.py reuses them) ----------------------------------------------


def write_tokenizer(path):
    """643 regular tokens (the 256 byte-level symbols, no merges, placeholders up to 643) + Qwen's 22 specials at
    643..664; prepare.load_tokenizer then adds the latent tokens at 665..667, as for the synthetic model."""
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for j in range(643 - len(vocab)):
        vocab[f"<|placeholder_{j}|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in prepare.QWEN_SPECIAL_TOKENS])
    tok.save(str(path))
    return path


def image(w=56, h=56, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@torch.no_grad()
def tiny_model(seed=0, std=0.1):
    torch.manual_seed(seed)
    m = model.Qwen25VL(model.PRESETS["tiny"])
    g = torch.Generator().manual_seed(seed)
    for name, p in m.named_parameters():
        noise = torch.randn(p.shape, generator=g) * std
        p.copy_(1.0 + noise if p.ndim == 1 and ("norm" in name or "ln_q" in name) else noise)
    return m.eval()


def tiny_basis(d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    f = latent_head.PCAFitter(d)
    f.update(torch.randn(400, d, generator=g) * torch.linspace(3.0, 0.1, d) + 2.0)
    return f.finish(0.9)


@lru_cache(maxsize=None)
def tiny_folder(root, kind="pca", boost=True):
    """A train.py-style output folder (config.json, model.safetensors, tokenizer.json, pca.safetensors,
    latent_head.safetensors, gap.json) under `root`; kind None writes a plain HF checkpoint (no gap.json, no head)."""
    out = Path(root) / f"model-{kind}-{int(boost)}"
    out.mkdir(parents=True, exist_ok=True)
    m = tiny_model()
    write_tokenizer(out / "tokenizer.json")
    tok = prepare.load_tokenizer(out)
    ids = prepare.token_ids(tok)
    basis = tiny_basis()
    head = latent_head.make_head(kind or "raw", 64, basis)
    torch.manual_seed(1)
    for name, p in head.named_parameters():   # non-trivial heads: zero-init outputs would make pca a projection
        if "down_proj" in name:
            torch.nn.init.normal_(p, std=0.05)
    b = sample.Bundle(model=m, tok=tok, ids=ids, head=head, basis=basis, n_latents=N, kind=kind, path=str(out))
    if boost:
        hA = sample.generate_naive(b, image(56, 56, 1), Q_A, mode="zero", max_new_tokens=1, debug=True)["hidden"][0]
        hB = sample.generate_naive(b, image(84, 56, 2), Q_B, mode="zero", max_new_tokens=1, debug=True)["hidden"][0]
        perp = hA - (hA @ hB) / (hB @ hB) * hB                                 # orthogonal to hB
        top = (m.lm_head.weight @ hA).max()
        with torch.no_grad():
            m.lm_head.weight[ids["latent_start"]] = (top + 5.0) / (perp @ perp) * perp
    model.save_pretrained(m, out)
    if kind is not None:
        basis.save(out / "pca.safetensors")
    if kind in ("pca", "full"):
        latent_head.save_head(head, out / "latent_head.safetensors")
    if kind is not None:
        (out / "gap.json").write_text(json.dumps({
            "latent_head": kind, "n_latents": N, "vision_norm": 1.0, "tau": 0.0, "lambda_latent": 1.0,
            "latent_ids": {"start": ids["latent_start"], "pad": ids["latent_pad"], "end": ids["latent_end"]}}))
    return out


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("sample"))


@pytest.fixture(scope="module")
def bundle(root):
    return sample.load(tiny_folder(root, "pca"))


# ---- tests ---------------------------------------------------------------------------------------------------------


def _span_shape(row, ids, n):
    """Every span is <|latent_start|>, exactly n latent positions, then <|latent_end|> (unless the budget cut it)."""
    t = row["token_ids"]
    for j, tid in enumerate(t):
        if tid == ids["latent_start"]:
            body = t[j + 1:j + 1 + n]
            assert body == [ids["latent_pad"]] * len(body)
            if j + 1 + n < len(t):
                assert len(body) == n and t[j + 1 + n] == ids["latent_end"], t
    for s in row["latent_spans"][:-1]:
        assert s["count"] == n


@pytest.mark.parametrize("mode", ["pca", "raw", "noise"])
def test_cached_matches_naive(bundle, mode):
    img = image(56, 56, 1)
    got = sample.generate(bundle, [img], [Q_A], mode=mode, max_new_tokens=STEPS, debug=True)[0]
    ref = sample.generate_naive(bundle, img, Q_A, mode=mode, max_new_tokens=STEPS, debug=True)
    assert got["token_ids"] == ref["token_ids"]
    assert got["token_ids"][0] == bundle.ids["latent_start"], "the boosted row must open a span at once"
    assert got["latent_spans"] and got["latent_spans"][0]["count"] == N
    assert [s["count"] for s in got["latent_spans"]] == [s["count"] for s in ref["latent_spans"]]
    assert got["text"] == ref["text"] and got["n_generated"] == ref["n_generated"]
    torch.testing.assert_close(got["hidden"], ref["hidden"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got["latents"], ref["latents"], atol=1e-4, rtol=1e-4)
    _span_shape(got, bundle.ids, N)


def test_sampling_cached_matches_naive(bundle):
    # temperature + top-p: one row draws the same (1, V) noise per step in both paths
    kw = dict(mode="pca", max_new_tokens=STEPS, temperature=1.0, top_p=0.9, seed=3)
    got = sample.generate(bundle, [image(56, 56, 1)], [Q_B], **kw)[0]
    ref = sample.generate_naive(bundle, image(56, 56, 1), Q_B, **kw)
    again = sample.generate(bundle, [image(56, 56, 1)], [Q_B], **kw)[0]
    assert got["token_ids"] == ref["token_ids"] == again["token_ids"]


def test_batch_equals_rows_alone(bundle):
    imgs, qs = [image(56, 56, 1), image(84, 56, 2)], [Q_A, Q_B]   # different prompt lengths: row A is left-padded
    batch = sample.generate(bundle, imgs, qs, mode="pca", max_new_tokens=STEPS, debug=True)
    alone = [sample.generate(bundle, [i], [q], mode="pca", max_new_tokens=STEPS, debug=True)[0]
             for i, q in zip(imgs, qs)]
    ls = bundle.ids["latent_start"]
    assert batch[0]["token_ids"][0] == ls and batch[1]["token_ids"][0] != ls, "rows must be in different modes"
    for b, a in zip(batch, alone):
        assert b["token_ids"] == a["token_ids"] and b["text"] == a["text"]
        assert [s["count"] for s in b["latent_spans"]] == [s["count"] for s in a["latent_spans"]]
        assert [s["mean_norm"] for s in b["latent_spans"]] == pytest.approx([s["mean_norm"] for s in a["latent_spans"]])
        torch.testing.assert_close(b["hidden"], a["hidden"], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(b["latents"], a["latents"], atol=1e-4, rtol=1e-4)


def test_zero_never_opens_a_span(bundle):
    rows = sample.generate(bundle, [image(56, 56, 1), image(84, 56, 2)], [Q_A, Q_B], mode="zero",
                           max_new_tokens=STEPS)
    for r in rows:
        assert bundle.ids["latent_start"] not in r["token_ids"] and r["latent_spans"] == []
        assert r["n_generated"] == len(r["token_ids"]) <= STEPS


@pytest.mark.parametrize("n", [0, 1, 5])
def test_spans_have_exactly_n_latents(bundle, n):
    row = sample.generate(bundle, [image(56, 56, 1)], [Q_A], mode="raw", n_latents=n, max_new_tokens=STEPS)[0]
    assert row["latent_spans"] and row["latent_spans"][0]["count"] == n
    _span_shape(row, bundle.ids, n)
    assert row["text"].count(prepare.LATENT_PLACEHOLDER) == len(row["latent_spans"])


@pytest.mark.parametrize("mode", ["pca", "raw"])
def test_ema_norm_rescales_to_image_norm(bundle, mode):
    img = image(56, 56, 1)
    row = sample.generate(bundle, [img], [Q_A], mode=mode, ema_norm=True, max_new_tokens=STEPS, debug=True)[0]
    # the target, computed independently: mean L2 norm of the query image's merged ViT embeddings
    pv, grid = model.preprocess_image(img)
    with torch.no_grad():
        target = bundle.model.visual(pv, grid).float().norm(dim=-1).mean()
    assert row["latents"].shape[0] >= N
    torch.testing.assert_close(row["latents"].norm(dim=-1), target.expand(row["latents"].shape[0]),
                               atol=1e-4, rtol=1e-4)
    assert row["latent_spans"][0]["mean_norm"] == pytest.approx(float(target), rel=1e-4)
    plain = sample.generate(bundle, [img], [Q_A], mode=mode, max_new_tokens=STEPS, debug=True)[0]
    assert not torch.allclose(plain["latents"].norm(dim=-1)[0], target, rtol=1e-2)   # it really changed something


def test_heads_loaded_per_gap_json(root, bundle):
    assert bundle.kind == "pca" and isinstance(bundle.head, latent_head.PCAHead) and bundle.n_latents == N
    full = sample.load(tiny_folder(root, "full"))
    assert full.kind == "full" and sample.available_modes(full) == ["full", "raw", "zero", "noise"]
    with pytest.raises(ValueError, match="mode 'pca' needs a trained pca latent head"):
        sample.generate(full, [image()], [Q_A], mode="pca")
    row = sample.generate(full, [image(56, 56, 1)], [Q_A], mode="full", max_new_tokens=6)[0]
    assert row["latent_spans"][0]["count"] == N


def test_plain_checkpoint_refuses_pca(root):
    b = sample.load(tiny_folder(root, None))
    assert b.kind is None and b.head is None and b.n_latents == sample.DEFAULT_LATENTS
    with pytest.raises(ValueError, match=r"mode 'pca'.*plain HF checkpoint.*raw and zero"):
        sample.generate(b, [image()], [Q_A], mode="pca")
    with pytest.raises(ValueError, match="mode 'full'"):
        sample.check_mode(b, "full")
    rows = sample.generate(b, [image(56, 56, 1)], [Q_A], mode="raw", n_latents=2, max_new_tokens=6)
    assert rows[0]["latent_spans"][0]["count"] == 2
    assert sample.generate(b, [image(56, 56, 1)], [Q_A], mode="zero", max_new_tokens=4)[0]["latent_spans"] == []


def test_cli_prints_compact_spans(root, tmp_path, capsys):
    folder = tiny_folder(root, "pca")
    image(56, 56, 1).save(tmp_path / "q.png")
    argv = ["--model", str(folder), "--image", str(tmp_path / "q.png"), "--question", Q_A, "--max-new-tokens", "8"]
    sample.main(argv)
    out = capsys.readouterr().out
    assert f"<latent x{N} |v|=" in out
    sample.main(argv + ["--json", "--mode", "zero"])
    d = json.loads(capsys.readouterr().out)
    assert d["mode"] == "zero" and d["latent_spans"] == [] and {"text", "token_ids", "n_generated"} <= set(d)


def test_pixel_limits_change_image_tokens(root, tmp_path, capsys):
    """The smart_resize limits come from the command line, else gap.json (trained resolution), else
    preprocessor_config.json (both spellings), else transformers' defaults; they change the image token count."""
    import shutil
    folder = tmp_path / "m"
    shutil.copytree(tiny_folder(root, "pca"), folder)
    img = image(224, 224, 3)                                   # 50176 px: 64 image tokens at the defaults

    def n_image_tokens(b):
        ids = sample.encode_prompts(b, [img], [Q_A])[0][0]
        return ids.count(b.ids["image_pad"])

    b = sample.load(folder)
    assert b.pixels[2] == "defaults" and n_image_tokens(b) == 64
    (folder / "preprocessor_config.json").write_text(json.dumps({"size": {"shortest_edge": 3136,
                                                                          "longest_edge": 112 * 112}}))
    assert n_image_tokens(sample.load(folder)) == 16           # 112 x 112 = 16 tokens of 28 x 28
    (folder / "preprocessor_config.json").write_text(json.dumps({"min_pixels": 3136, "max_pixels": 168 * 168,
                                                                 "size": {"shortest_edge": 1, "longest_edge": 2}}))
    assert n_image_tokens(sample.load(folder)) == 36           # min/max_pixels win over size, like transformers
    gap = json.loads((folder / "gap.json").read_text())
    (folder / "gap.json").write_text(json.dumps({**gap, "image_min_pixels": 3136, "image_max_pixels": 56 * 56}))
    b = sample.load(folder)
    assert b.pixels[2].endswith("gap.json") and n_image_tokens(b) == 4      # the trained resolution wins
    b = sample.load(folder, max_pixels=140 * 140)
    assert b.pixels[:2] == (3136, 140 * 140) and n_image_tokens(b) == 25    # the command line wins
    img.save(tmp_path / "q.png")
    sample.main(["--model", str(folder), "--image", str(tmp_path / "q.png"), "--question", Q_A,
                 "--max-new-tokens", "2", "--mode", "zero", "--min-pixels", "784", "--max-pixels", "784"])
    assert "image pixels: min_pixels 784 max_pixels 784 (command line)" in capsys.readouterr().err
