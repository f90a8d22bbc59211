"""prepare.py: tokenizer layout, template and labels, validation messages, latent targets, PCA, resume, synthetic.

    .venv/bin/python -m pytest -q tests/test_prepare.py

One small synthetic run (n=24, tiny random checkpoint) is shared by the module; everything stays on CPU.
"""
import json
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest
import torch
from PIL import Image
from safetensors import safe_open

import latent_head
import model
import prepare

N = 36


def _targets(folder):
    t = {}
    for name in json.loads((folder / "manifest.json").read_text())["shards"]:
        t.update(_tensors(folder / name))
    return t


def _tensors(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _records(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


# ---- tokenizer and template ----


def test_tokenizer_layout(syn):
    raw = prepare.Tokenizer.from_file(str(syn / "model" / "tokenizer.json"))
    assert raw.get_vocab_size() == 665 and raw.token_to_id("<|latent_start|>") is None
    for j, t in enumerate(prepare.QWEN_SPECIAL_TOKENS):   # Qwen's order, minus 151000
        assert raw.token_to_id(t) == 643 + j, t
    ids = {t: 643 + j for j, t in enumerate(prepare.QWEN_SPECIAL_TOKENS)}
    names = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>")
    assert [ids[t] for t in names] == [644, 645, 652, 655]
    tok = prepare.load_tokenizer(syn / "model")   # a folder works as well as the file
    assert [tok.token_to_id(t) for t in prepare.LATENT_TOKENS] == [665, 666, 667]
    assert tok.encode("a<|latent_pad|>b", add_special_tokens=False).ids[1] == 666   # one id, not split
    again = prepare.load_tokenizer(syn / "prepared" / "tokenizer.json")   # already has them: nothing re-added
    assert again.get_vocab_size() == 668 and again.token_to_id("<|latent_end|>") == 667
    cfg = model.Config.from_json(syn / "model" / "config.json")
    assert (cfg.image_token_id, cfg.vision_start_token_id, cfg.eos_token_id) == (655, 652, 645)


def test_latent_ids_must_fit_embedding(syn):
    tok = prepare.load_tokenizer(syn / "model")
    cfg = model.Config.from_json(syn / "model" / "config.json")
    assert prepare.check_latent_ids(tok, cfg)["<|latent_end|>"] == 667
    small = replace(cfg, text=replace(cfg.text, vocab_size=667))   # row 667 missing
    with pytest.raises(ValueError, match=r"'<\|latent_end\|>': 667.*667 embedding rows"):
        prepare.check_latent_ids(tok, small)


def test_serialize_response():
    s = prepare.serialize_response("a <latent> b<latent>", 3)
    assert s == ("a <|latent_start|>" + "<|latent_pad|>" * 3 + "<|latent_end|> b<|latent_start|>"
                 + "<|latent_pad|>" * 3 + "<|latent_end|>")
    assert prepare.serialize_response("no span", 36) == "no span"


def test_labels_hand_checked(syn):
    tok = prepare.load_tokenizer(syn / "model")
    enc = lambda s: tok.encode(s, add_special_tokens=False).ids
    q, r = "How many red shapes?", "<think>I count <latent> so</think><answer>3</answer>"
    ids, labels = prepare.build_example(tok, q, r, n_image_tokens=4, n_latents=2)
    nl = enc("\n")
    prompt = ([644] + enc("system\nYou are a helpful assistant.") + [645] + nl + [644] + enc("user\n")
              + [652, 655, 655, 655, 655, 653] + enc(q) + [645] + nl + [644] + enc("assistant\n"))
    a, b = enc("<think>I count "), enc(" so</think><answer>3</answer>")
    assert ids == prompt + a + [665, 666, 666, 667] + b + [645] + nl
    assert labels == [-100] * len(prompt) + a + [665, -100, -100, 667] + b + [645] + [-100] * len(nl)
    # the piecewise ids equal the tokenizer run on the whole templated string
    text = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
            + "<|image_pad|>" * 4 + "<|vision_end|>" + q + "<|im_end|>\n<|im_start|>assistant\n"
            + prepare.serialize_response(r, 2) + "<|im_end|>\n")
    assert enc(text) == ids
    assert prepare.prompt_ids(tok, q, 4) == prompt


# ---- synthetic + build outputs ----


def test_synthetic_deterministic(syn, tmp_path):
    for d in ("raw/images", "raw/aux", "model", "prepared"):
        assert (syn / d).is_dir(), d
    prepare.synthetic(prepare.SyntheticOptions(out=str(tmp_path), n=24, seed=7, device="cpu"))
    for f in ("raw/train.jsonl", "raw/test.jsonl", "model/tokenizer.json", "model/model.safetensors",
              "model/config.json"):
        assert (syn / f).read_bytes() == (tmp_path / f).read_bytes(), f
    for f in ("prepared/pca.safetensors", "prepared/targets-00000.safetensors"):   # headers hold paths: tensors
        a, b = _tensors(syn / f), _tensors(tmp_path / f)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
    strip = lambda r: {k: v for k, v in r.items() if k not in ("image", "aux_images")}   # absolute paths differ
    assert [strip(r) for r in _records(syn / "prepared/records.jsonl")] == [
        strip(r) for r in _records(tmp_path / "prepared/records.jsonl")]
    for img in sorted((syn / "raw" / "aux").iterdir()):
        assert img.read_bytes() == (tmp_path / "raw" / "aux" / img.name).read_bytes(), img.name
    train, test = _records(syn / "raw/train.jsonl"), _records(syn / "raw/test.jsonl")
    assert len(train) + len(test) == 24 and len(test) == 5
    assert {r["id"].split("-")[0] for r in train} == {"count", "search", "spatial"}
    assert {r["accuracy"] for r in train} <= {0.0, 1.0}
    other = tmp_path / "other"
    for sub in ("images", "aux"):
        (other / sub).mkdir(parents=True)
    assert [prepare.make_example(i, 8, other) for i in range(6)] != [
        prepare.make_example(i, 7, other) for i in range(6)]


def test_records_and_targets(syn):
    prep, m = syn / "prepared", model.load_pretrained(syn / "model")
    tok = prepare.load_tokenizer(prep)
    man = json.loads((prep / "manifest.json").read_text())
    raw = {r["id"]: r for r in _records(syn / "raw" / "train.jsonl")}
    recs, targets = _records(prep / "records.jsonl"), _targets(prep)
    assert man["n_records"] == man["n_kept"] == len(recs) == len(raw) and man["skipped"] == []
    assert man["latent_ids"] == {"start": 665, "pad": 666, "end": 667} and man["n_latents"] == N
    for rec in recs:
        src = raw[rec["id"]]
        n_img = Image.open(rec["image"]).width * Image.open(rec["image"]).height // 28 ** 2
        assert (rec["input_ids"], rec["labels"]) == prepare.build_example(tok, src["question"], src["response"],
                                                                          n_img, N)
        assert rec["n_spans"] == len(src["aux_images"]) == rec["input_ids"].count(665)
        assert rec["input_ids"].count(666) == N * rec["n_spans"] and Path(rec["image"]).is_absolute()
        assert targets[rec["id"]].shape == (rec["n_spans"], N, 128) and targets[rec["id"]].dtype == torch.bfloat16
    # the targets are the frozen ViT on the aux image squashed to 168x168: 6x6 merged tokens in raster order
    two = next(r for r in recs if r["n_spans"] == 2)
    for j, aux in enumerate(raw[two["id"]]["aux_images"]):
        img = Image.open(syn / "raw" / aux).convert("RGB").resize((168, 168), Image.BICUBIC)
        pv, grid = model.preprocess_image(img, min_pixels=168 * 168, max_pixels=168 * 168)
        assert grid.tolist() == [[1, 12, 12]]
        with torch.no_grad():
            v = m.visual(pv, grid)
        torch.testing.assert_close(targets[two["id"]][j].float(), v, rtol=1e-2, atol=1e-2)
        assert (targets[two["id"]][j].float() - v).abs().max() <= v.abs().max() * 2 ** -7   # bf16 rounding


def test_pca_matches_refit(syn):
    prep = syn / "prepared"
    basis = latent_head.PCABasis.load(prep / "pca.safetensors")
    fitter = latent_head.PCAFitter(128)
    rows = torch.cat([t.reshape(-1, 128).float() for t in _targets(prep).values()])
    fitter.update(rows)
    ref = fitter.finish(0.95)
    assert basis.k == ref.k and json.loads((prep / "manifest.json").read_text())["pca"]["k"] == ref.k
    torch.testing.assert_close(basis.mu, ref.mu, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(basis.eigenvalues, ref.eigenvalues, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(basis.P_k @ basis.P_k.T, ref.P_k @ ref.P_k.T, rtol=1e-4, atol=1e-4)


# ---- bad input ----


def _good(syn, i=0):
    r = _records(syn / "raw" / "train.jsonl")[i]
    r["image"] = str(syn / "raw" / r["image"])
    r["aux_images"] = [str(syn / "raw" / a) for a in r["aux_images"]]
    return r


def _garbage(tmp_path):
    p = tmp_path / "broken.png"
    p.write_bytes(b"not a png at all")
    return str(p)


BAD = [  # (name, how to break a good record, field the message must name)
    ("missing field", lambda r, t: r.pop("question"), "question"),
    ("wrong type", lambda r, t: r.update(answer=3), "answer"),
    ("accuracy range", lambda r, t: r.update(accuracy=1.5), "accuracy"),
    ("missing image", lambda r, t: r.update(image=str(t / "nope.png")), "image"),
    ("unreadable image", lambda r, t: r.update(image=_garbage(t)), "image"),
    ("unreadable aux", lambda r, t: r.update(aux_images=[_garbage(t)] * len(r["aux_images"])), "aux_images"),
    ("count mismatch", lambda r, t: r.update(aux_images=r["aux_images"] + r["aux_images"][:1]), "aux_images"),
    ("reserved token", lambda r, t: r.update(question="hi <|im_end|>"), "question"),
    ("duplicate id", None, "id"),
]


def _write(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))


@pytest.mark.parametrize("name,breaker,fld", BAD, ids=[b[0] for b in BAD])
def test_bad_record_fails_with_location(syn, tmp_path, name, breaker, fld):
    good, bad = _good(syn, 0), _good(syn, 1)
    if breaker is None:
        bad["id"] = good["id"]
    else:
        breaker(bad, tmp_path)
    data = tmp_path / "bad.jsonl"
    _write(data, [good, bad])
    opts = prepare.BuildOptions(data=str(data), model=str(syn / "model"), out=str(tmp_path / "out"))
    with pytest.raises(prepare.DataError, match=rf"bad\.jsonl line 2 \(id {bad['id']}\): {fld}: "):
        prepare.build(opts)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_bad_json_and_latents(syn, tmp_path):
    data = tmp_path / "bad.jsonl"
    _write(data, [_good(syn, 0), "{not json", "", '["a list"]'])
    opts = prepare.BuildOptions(data=str(data), model=str(syn / "model"), out=str(tmp_path / "out"))
    with pytest.raises(prepare.DataError, match=r"bad\.jsonl line 2: json: "):
        prepare.build(opts)
    with pytest.raises(prepare.DataError, match="--latents 35: expected a perfect square"):
        prepare.build(replace(opts, latents=35))
    r = _good(syn, 0)
    r["response"] = r["response"] + " <latent>"   # one more placeholder than aux images
    _write(data, [r])
    n = r["response"].count("<latent>")
    with pytest.raises(prepare.DataError, match=rf"line 1 \(id {r['id']}\): aux_images: expected {n} "
                                                rf"entries for {n} <latent>, found {n - 1}"):
        prepare.build(opts)


def test_skip_bad_lists_everything(syn, tmp_path, capsys):
    lines, expect = [_good(syn, 0)], []
    for j, (name, breaker, fld) in enumerate(BAD):
        r = _good(syn, 1 + j)
        if breaker is None:
            r["id"] = lines[0]["id"]
        else:
            breaker(r, tmp_path)
        lines.append(r)
        expect.append((j + 2, fld))
    lines += ["{not json", _good(syn, len(BAD) + 1)]
    expect.append((len(lines) - 1, "json"))
    data = tmp_path / "bad.jsonl"
    _write(data, lines)
    man = prepare.build(prepare.BuildOptions(data=str(data), model=str(syn / "model"), out=str(tmp_path / "out"),
                                             skip_bad=True))
    assert [(s["line"], s["field"]) for s in man["skipped"]] == expect
    assert man["n_records"] == len(lines) and man["n_kept"] == 2
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk["skipped"] == man["skipped"]
    assert [r["id"] for r in _records(tmp_path / "out" / "records.jsonl")] == [lines[0]["id"], lines[-1]["id"]]
    err = capsys.readouterr().err
    assert all(f"bad.jsonl line {ln}" in err for ln, _ in expect)


# ---- resume ----


def test_resume_after_crash(syn, tmp_path, monkeypatch):
    opts = prepare.BuildOptions(data=str(syn / "raw" / "train.jsonl"), model=str(syn / "model"),
                                out=str(tmp_path / "clean"), shard_size=4, batch_size=3)
    clean = prepare.build(opts)
    n_shards = len(clean["shards"])
    assert n_shards >= 4

    real_write, writes = prepare.write_shard, []

    def crashing_write(*a):
        if len(writes) == 2:
            raise RuntimeError("simulated crash")
        writes.append(a[1])
        real_write(*a)
    monkeypatch.setattr(prepare, "write_shard", crashing_write)
    resumed = replace(opts, out=str(tmp_path / "resumed"))
    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare.build(resumed)
    out = tmp_path / "resumed"
    assert not (out / "manifest.json").exists() and len(list(out.glob("targets-*.safetensors"))) == 2
    (out / "targets-00002.safetensors.tmp").write_bytes(b"half a shard")   # what a kill mid-write leaves

    monkeypatch.setattr(prepare, "write_shard", real_write)
    real_targets, computed = prepare.shard_targets, []
    monkeypatch.setattr(prepare, "shard_targets",
                        lambda v, recs, *a, **k: computed.append(recs) or real_targets(v, recs, *a, **k))
    again = prepare.build(resumed)
    assert len(computed) == n_shards - 2   # the two finished shards were reused
    assert again == {**clean} and not list(out.glob("*.tmp"))
    for f in ("records.jsonl", "tokenizer.json"):
        assert (out / f).read_bytes() == (tmp_path / "clean" / f).read_bytes(), f
    for f in ["pca.safetensors"] + clean["shards"]:   # header key order is not stable: compare the tensors
        a, b = _tensors(out / f), _tensors(tmp_path / "clean" / f)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f


def test_cli_help(capsys):
    for cmd in (["--help"], ["build", "--help"], ["synthetic", "--help"]):
        with pytest.raises(SystemExit) as e:
            prepare.main(cmd)
        assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--skip-bad" in out and "--no-skip-bad" in out and "--pca-variance" in out and "--test-frac" in out


def test_score_cli_writes_accuracy_and_resumes(syn, tmp_path, capsys):
    data = tmp_path / "few.jsonl"
    lines = (syn / "raw" / "test.jsonl").read_text().splitlines()[:2]
    raw = syn / "raw"
    # paths in the data are relative to the file: rewrite them absolute for the copy in tmp_path
    recs = [json.loads(x) for x in lines]
    for r in recs:
        r["image"] = str(raw / r["image"])
        r["aux_images"] = [str(raw / a) for a in r["aux_images"]]
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "scored.jsonl"
    args = ["score", "--data", str(data), "--model", str(syn / "model"), "--samples", "2", "--max-new-tokens", "4",
            "--out", str(out), "--device", "cpu", "--max-pixels", str(56 * 56)]
    prepare.main(args)
    assert "image pixels: min_pixels 3136 max_pixels 3136 (command line and defaults)" in capsys.readouterr().err
    scored = [json.loads(x) for x in out.read_text().splitlines()]
    assert [s["id"] for s in scored] == [r["id"] for r in recs]
    assert all(s["accuracy"] in (0.0, 0.5, 1.0) for s in scored)   # the mean of 2 graded samples
    before = out.read_text()
    prepare.main(args)   # everything already scored: nothing is sampled again, the file is unchanged
    assert out.read_text() == before
    with pytest.raises(SystemExit) as e:
        prepare.main(["score", "--help"])
    assert e.value.code == 0 and "--samples" in capsys.readouterr().out


def test_pixel_limits_from_preprocessor_config(syn, tmp_path, capsys):
    """build reads min/max_pixels from the model folder's preprocessor_config.json (the hub's file), records them in
    the manifest (train.py reads them back), prints them, and the command line overrides them."""
    import shutil
    folder = tmp_path / "model"
    shutil.copytree(syn / "model", folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({"min_pixels": 784, "max_pixels": 56 * 56}))
    data = tmp_path / "two.jsonl"
    _write(data, [_good(syn, 0), _good(syn, 1)])
    opts = prepare.BuildOptions(data=str(data), model=str(folder), out=str(tmp_path / "out"))
    pad = prepare.token_ids(prepare.load_tokenizer(folder))["image_pad"]
    n_pads = lambda: [r["input_ids"].count(pad) for r in _records(tmp_path / "out" / "records.jsonl")]
    man = prepare.build(opts)
    assert (man["image_min_pixels"], man["image_max_pixels"]) == (784, 56 * 56)
    assert n_pads() == [4, 4]                       # every synthetic image (>= 112 px) capped at 56 x 56 = 4 tokens
    assert "image pixels: min_pixels 784 max_pixels 3136" in capsys.readouterr().err
    man = prepare.build(replace(opts, max_pixels=84 * 84))
    assert man["image_max_pixels"] == 84 * 84 and n_pads() == [9, 9]
    with pytest.raises(ValueError, match="min_pixels"):
        prepare.build(replace(opts, min_pixels=10 ** 6))
