"""VaLR from the same code: the step layout, external encoder targets (validation, storage), the stand-in encoder,
the output-as-input rollout of training, and the two training stages lowering L_REPA on the synthetic data.

    .venv/bin/python -m pytest -q tests/test_valr.py
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import latent_head
import prepare
import sample
import train
import valr

K = 4   # latents per block in these tests (VaLR: 16); small so the CPU runs stay fast


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    out = tmp_path_factory.mktemp("valr")
    prepare.synthetic(prepare.SyntheticOptions(out=str(out), n=16, seed=3, device="cpu"))
    return out


@pytest.fixture(scope="module")
def plain(syn):
    """The synthetic train split as plain CoT (no <latent>, no aux images), two "Step n:" steps per response."""
    recs = [json.loads(line) for line in (syn / "raw" / "train.jsonl").read_text().splitlines()]
    for r in recs:
        r["response"] = (f"<think>Step 1: {r['question']}\nStep 2: so it is {r['answer']}.</think>"
                         f"<answer>{r['answer']}</answer>")
        r["aux_images"] = []
    path = syn / "raw" / "plain.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def _tensors(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


# ---- layout ----


def test_layout_hand_checked(syn):
    r = "<think>Step 1: find the red ones.\nStep 2: count: 3.</think><answer>3</answer>"
    assert valr.layout(r) == ("<think><latent>Step 1: find the red ones.\n<latent>Step 2: count: 3.</think>"
                              "<answer>3</answer>")
    assert valr.layout("<think>First A.\n\nThen B.</think><answer>x</answer>") == \
        "<think><latent>First A.\n\n<latent>Then B.</think><answer>x</answer>"             # paragraphs
    assert valr.layout("A is red.\nB is blue.\n<answer>no</answer>") == \
        "<latent>A is red.\n<latent>B is blue.\n<answer>no</answer>"                        # lines, no <think>
    assert valr.layout("<think>one step</think><answer>x</answer>") == "<think><latent>one step</think><answer>x</answer>"
    assert valr.layout("<think>  </think><answer>x</answer>") == "<think>  </think><answer>x</answer>"   # no step
    assert valr.layout("a <latent> b") == "a <latent> b"                               # blocks the data marks stay
    # tokenized: <|latent_start|> + K pads + <|latent_end|> before each step, pads unsupervised
    tok = prepare.load_tokenizer(syn / "model")
    enc = lambda s: tok.encode(s, add_special_tokens=False).ids
    ids, labels = prepare.build_example(tok, "q", valr.layout(r), n_image_tokens=4, n_latents=K)
    block = [665] + [666] * K + [667]
    resp = (enc("<think>") + block + enc("Step 1: find the red ones.\n") + block
            + enc("Step 2: count: 3.</think><answer>3</answer>") + [645] + enc("\n"))
    assert ids[-len(resp):] == resp
    assert labels.count(-100) == len(ids) - len(resp) + 2 * K + len(enc("\n"))


# ---- external targets: stand-in encoder, build, validation ----


def _build(syn, data, out, *external, k=K):
    argv = ["build", "--data", str(data), "--model", str(syn / "model"), "--out", str(out), "--layout", "valr",
            "--k", str(k), "--device", "cpu"]
    for e in external:
        argv += ["--external", e]
    prepare.main(argv)
    return json.loads((Path(out) / "manifest.json").read_text())


def test_standin_and_build_valr_layout(syn, plain, tmp_path):
    valr.main(["standin", "--data", str(plain), "--out", str(tmp_path / "a.safetensors"), "--layout", "valr"])
    valr.main(["standin", "--data", str(plain), "--out", str(tmp_path / "b.safetensors"), "--layout", "valr",
               "--patches", "9", "--dim", "12", "--seed", "1"])
    feats = _tensors(tmp_path / "a.safetensors")
    rec = json.loads(plain.read_text().splitlines()[0])
    enc = valr.StandinEncoder(16, 32, seed=0)
    img = syn / "raw" / rec["image"]
    assert feats[rec["id"]].shape == (2, 16, 32)                  # 2 steps, each the question image's features
    torch.testing.assert_close(feats[rec["id"]], torch.stack([enc(img), enc(img)]))
    assert not torch.allclose(enc(img), valr.StandinEncoder(16, 32, seed=1)(img))

    man = _build(syn, plain, tmp_path / "prep", f"a={tmp_path / 'a.safetensors'}", f"b={tmp_path / 'b.safetensors'}")
    assert man["layout"] == "valr" and man["n_latents"] == K and man["pca"] is None and man["shards"] == []
    assert {n: (e["patches"], e["dim"]) for n, e in man["external"].items()} == {"a": (16, 32), "b": (9, 12)}
    assert not (tmp_path / "prep" / "pca.safetensors").exists()
    rows = [json.loads(line) for line in (tmp_path / "prep" / "records.jsonl").read_text().splitlines()]
    assert all(r["n_spans"] == 2 and r["input_ids"].count(666) == 2 * K for r in rows)
    stored = _tensors(tmp_path / "prep" / man["external"]["b"]["shards"][0])
    assert stored.keys() == {r["id"] for r in rows} and all(t.dtype == torch.bfloat16 for t in stored.values())
    src = _tensors(tmp_path / "b.safetensors")
    torch.testing.assert_close(stored[rec["id"]].float(), src[rec["id"]], atol=1e-2, rtol=1e-2)
    # train.Records hands them out per record; a plain record (tau < 0) has none
    recs = train.Records(tmp_path / "prep", tau=1.0)
    ex = recs.get(0)
    assert ex["targets"] is None and ex["external"]["a"].shape == (2, 16, 32)
    assert train.Records(tmp_path / "prep", tau=-1.0).get(0)["external"] is None


BAD = [  # how to break the file -> what the one-line message must say
    ("wrong shape", lambda t, rid: t.update({rid: torch.randn(3, 16, 32)}), r"expected a floating \(2, 16, 32\)"),
    ("other P", lambda t, rid: t.update({rid: torch.randn(2, 9, 32)}), r"expected a floating \(2, 16, 32\).*\(2, 9, 32\)"),
    ("missing id", lambda t, rid: t.pop(rid), r"found no such id in the file"),
    ("NaN", lambda t, rid: t[rid].view(-1)[5:7].fill_(float("nan")), r"expected finite values, found 2 NaN/inf"),
]


@pytest.mark.parametrize("name,breaker,msg", BAD, ids=[b[0] for b in BAD])
def test_external_validation_errors(syn, plain, tmp_path, capsys, name, breaker, msg):
    valr.main(["standin", "--data", str(plain), "--out", str(tmp_path / "good.safetensors"), "--layout", "valr"])
    t = _tensors(tmp_path / "good.safetensors")
    rid = json.loads(plain.read_text().splitlines()[1])["id"]   # the second record: the first fixes (P, d)
    breaker(t, rid)
    save_file(t, str(tmp_path / "bad.safetensors"))
    line = _cli_error(capsys, syn, plain, tmp_path / "out", f"dino={tmp_path / 'bad.safetensors'}")
    assert line.startswith(f"error: {tmp_path / 'bad.safetensors'} (id {rid}): external 'dino': ")
    assert re.search(msg, line), line
    assert not (tmp_path / "out" / "manifest.json").exists()


def _cli_error(capsys, syn, plain, out, *external):
    """Run `prepare.py build` as the command line does; -> its one stderr line (exit code 1, no traceback)."""
    argv = ["build", "--data", str(plain), "--model", str(syn / "model"), "--out", str(out), "--layout", "valr",
            "--device", "cpu", *[a for e in external for a in ("--external", e)]]
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        prepare.run_main(prepare.main, argv)
    err = capsys.readouterr().err.strip().splitlines()   # an info line on the pixel limits may come first
    assert e.value.code == 1 and [x for x in err if "error" in x] == err[-1:], err
    return err[-1]


def test_external_spec_errors(syn, plain, tmp_path, capsys):
    (tmp_path / "junk.st").write_bytes(b"not a safetensors file")
    for spec, msg in (("nofile", "expected NAME=FILE"), ("gap=x", "reserved"),
                      (f"d={tmp_path / 'none.st'}", "found no such file"),
                      (f"d={tmp_path / 'junk.st'}", "found an unreadable one")):
        line = _cli_error(capsys, syn, plain, tmp_path / "out", spec)
        assert line.startswith("error: ") and msg in line, line


# ---- training: output-as-input rollout, REPA, the two stages ----


def test_rollout_equals_sequential_feedback(syn):
    """The chunked KV-cache rollout == feeding each latent back one at a time through a full recompute."""
    m = train.model.load_pretrained(syn / "model")
    torch.manual_seed(0)
    B, T, D = 2, 14, m.cfg.text.hidden_size
    x = torch.randn(B, T, D) * 0.5
    pos = torch.arange(T).view(1, 1, T).expand(3, B, T)
    lat = torch.zeros(B, T, dtype=torch.bool)
    lat[0, 3:6], lat[0, 9:11], lat[1, 5:8] = True, True, True   # blocks at different places per row
    head = latent_head.RawFeedback()
    got = sample.rollout_latents(m, head, x, pos, lat)
    want = x.clone()
    with torch.no_grad():
        for b in range(B):
            for t in lat[b].nonzero().flatten().tolist():
                want[b, t] = head(m.decode(want[b:b + 1, :t], pos[:, b:b + 1, :t])[0, -1])
    torch.testing.assert_close(got, want[lat], atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def prep(syn, tmp_path_factory):
    """The synthetic train split with --layout valr (its responses mark their blocks: kept) and two stand-in
    encoders, a (16 x 32) and b (16 x 24)."""
    out, data = tmp_path_factory.mktemp("valr-prep"), syn / "raw" / "train.jsonl"
    valr.main(["standin", "--data", str(data), "--out", str(out / "a.safetensors"), "--layout", "valr"])
    valr.main(["standin", "--data", str(data), "--out", str(out / "b.safetensors"), "--layout", "valr",
               "--dim", "24", "--seed", "1"])
    _build(syn, data, out / "prep", f"a={out / 'a.safetensors'}", f"b={out / 'b.safetensors'}")
    return out / "prep"


def test_two_stages_lower_repa(syn, prep, tmp_path):
    """Stage 1: plain CoT (every block stripped, tau < 0); stage 2 from stage 1's folder: K-latent blocks fed back
    (raw head, no latent MSE) and REPA on two stand-in encoders (VaLR-M). L_REPA goes down within a few steps."""
    common = dict(data=str(prep), global_batch=4, micro_batch=2, latent_head="raw", device="cpu")
    s1 = train.TrainConfig(model=str(syn / "model"), out=str(tmp_path / "s1"), tau=-1.0, lr=2e-3, head_lr=2e-3,
                           epochs=1, **common)
    train.main(s1)
    assert all(json.loads(r)["latents_fed"] == 0 for r in (tmp_path / "s1" / "metrics.jsonl").read_text().splitlines())
    s2 = train.TrainConfig(model=s1.out, out=str(tmp_path / "s2"), tau=1.0, lr=1e-3, head_lr=3e-3, epochs=3,
                           repa_layer=2, repa_weight=0.5, warmup_ratio=0.0, **common)
    gap = train.main(s2)
    assert set(gap.valr) == {"a", "b"} and gap.valr["b"].d_target == 24
    rows = [json.loads(r) for r in (tmp_path / "s2" / "metrics.jsonl").read_text().splitlines()]
    repa = [r["valr_loss"] for r in rows]
    assert all(r["latents_fed"] > 0 and r["latent_loss"] == 0.0 for r in rows)
    assert -1.0 <= min(repa) and max(repa) <= 1.0
    assert sum(repa[-3:]) / 3 < sum(repa[:3]) / 3 - 0.05, repa
    # the output folder generates K-latent blocks in raw mode
    bundle = sample.load(s2.out)
    assert bundle.kind == "raw" and bundle.n_latents == K
    with pytest.raises(ValueError, match="--repa-encoders c: .* has no c targets; it has a, b"):
        train.main(train.TrainConfig(model=s1.out, out=str(tmp_path / "x"), repa_layer=2, repa_encoders="c",
                                     **common))
    with pytest.raises(ValueError, match="no PCA basis"):
        train.main(train.TrainConfig(model=s1.out, out=str(tmp_path / "x"), **{**common, "latent_head": "pca"}))


def test_fsdp_two_ranks_equal_one(syn, prep, tmp_path):
    """FSDP all-gathers each layer per forward, and the rollout's number of decode calls depends on where a rank's
    blocks sit: the ranks must pad to the same count, or they hang. 2 gloo ranks == 1 rank on 2 steps."""
    args = dict(data=str(prep), model=str(syn / "model"), global_batch=4, micro_batch=1, latent_head="raw", tau=1.0,
                lr=1e-3, head_lr=3e-3, repa_layer=2, repa_weight=0.5, stop_after=2, device="cpu")
    train.main(train.TrainConfig(out=str(tmp_path / "one"), **args))
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in args.items()] + [f"--out={tmp_path / 'two'}", "--fsdp"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(Path(train.__file__)), *argv], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    m1, m2 = ([json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("one", "two"))
    assert len(m1) == len(m2) == 2
    for a, b in zip(m1, m2):
        assert a["lm_loss"] == pytest.approx(b["lm_loss"], rel=1e-5) and a["latents_fed"] == b["latents_fed"] > 0
        assert a["valr_loss"] == pytest.approx(b["valr_loss"], rel=1e-4, abs=1e-6)


# ---- generation: exactly K latents per block, several blocks per answer, batched and cached ----


def test_generation_k_latents_per_block(tmp_path, monkeypatch):
    """sample.py and eval.py raw mode (VaLR's output-as-input) on a tiny random model. A random model rarely opens a
    block, so <|latent_start|> gets +1e4 in the text-mode logit bias: every text step opens one, and an answer is
    blocks back to back. The loop itself (per-row state, forced <|latent_end|>, cache) is what runs."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import eval as gapeval
    import test_sample as ts
    folder = ts.tiny_folder(str(tmp_path), "raw", boost=False)
    bundle = sample.load(folder)
    plain_bias = sample.logit_bias

    def forced(bundle, mode, device):
        bias = plain_bias(bundle, mode, device)
        bias[bundle.ids["latent_start"]] = 1e4 if mode != "zero" else bias[bundle.ids["latent_start"]]
        return bias
    monkeypatch.setattr(sample, "logit_bias", forced)
    ids = bundle.ids
    block = [ids["latent_start"]] + [ids["latent_pad"]] * K + [ids["latent_end"]]
    images, questions = [ts.image(56, 56, 1), ts.image(84, 56, 2)], [ts.Q_A, ts.Q_B]   # prompts of unequal length
    rows = sample.generate(bundle, images, questions, mode="raw", n_latents=K, max_new_tokens=3 * (K + 2),
                           debug=True)
    for img, q, row in zip(images, questions, rows):
        assert row["token_ids"] == block * 3 and [s["count"] for s in row["latent_spans"]] == [K] * 3
        naive = sample.generate_naive(bundle, img, q, mode="raw", n_latents=K, max_new_tokens=3 * (K + 2), debug=True)
        assert naive["token_ids"] == row["token_ids"]                      # cached + batched == recompute, one row
        torch.testing.assert_close(naive["latents"], row["latents"], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(row["latents"][:K], row["hidden"][1:K + 1])   # raw: each latent is the h̄ before it
    # eval.py, batched, raw mode at the folder's N: every block of every answer has exactly N latents
    data = tmp_path / "d.jsonl"
    images[0].save(tmp_path / "a.png")
    images[1].save(tmp_path / "b.png")
    data.write_text("".join(json.dumps({"id": f"r{i}", "image": p, "question": q, "answer": "3"}) + "\n"
                            for i, (p, q) in enumerate([("a.png", ts.Q_A), ("b.png", ts.Q_B), ("a.png", ts.Q_B)])))
    opts = gapeval.EvalOptions(model=str(folder), data=str(data), modes="raw", out=str(tmp_path / "ev"),
                               max_new_tokens=4 * (ts.N + 2), batch_size=2, device="cpu")
    gapeval.evaluate(opts, bundle=bundle)
    preds = [json.loads(line) for line in (tmp_path / "ev" / f"predictions-raw-{ts.N}.jsonl").read_text().splitlines()]
    assert len(preds) == 3 and all([s["count"] for s in p["latent_spans"]] == [ts.N] * 4 for p in preds)
