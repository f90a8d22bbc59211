"""train.py: losses go down (with a short golden trace), stripping by tau, DDP == one rank, exact resume, bad input."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import prepare  # noqa: E402
import train  # noqa: E402

# The first steps of the synthetic run below (seed 12345, n=32): lm loss, latent loss. A change to the model,
# the data generator, the loss normalisation or the optimizer shows up here first. The latent loss is the
# per-element mean over d = 128 (--latent-loss mean): the first step is Eq. 2's summed 34.0837 / 128.
GOLDEN = [(6.9306, 0.2663), (6.7107, 0.2579), (6.3035, 0.0338), (6.0146, 0.0205)]


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn")
    prepare.main(["synthetic", "--out", str(out), "--n", "32", "--seed", "12345"])
    return out


def cfg_for(syn, out, **kw):
    base = dict(data=str(syn / "prepared"), model=str(syn / "model"), out=str(out), global_batch=4, micro_batch=2,
                lr=2e-3, head_lr=2e-3, epochs=2, device="cpu")
    base.update(kw)
    return train.TrainConfig(**base)


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_losses_decrease_and_golden_trace(syn, tmp_path):
    cfg = cfg_for(syn, tmp_path / "run", epochs=4, tau=1.0)   # tau 1: every record keeps its latent spans
    train.main(cfg)
    rows = metrics(cfg.out)
    lm = [r["lm_loss"] for r in rows]
    lat = [r["latent_loss"] for r in rows]
    assert all(r["n_latents"] > 0 for r in rows)
    first, last = sum(lm[:3]) / 3, sum(lm[-3:]) / 3
    assert last < first - 0.3, (first, last)
    assert sum(lat[-3:]) / 3 < 0.5 * sum(lat[:3]) / 3, lat
    trace = [(round(r["lm_loss"], 4), round(r["latent_loss"], 4)) for r in rows[:4]]
    print("golden trace", trace)
    if GOLDEN is not None:
        for (a, b), (ga, gb) in zip(trace, GOLDEN):
            assert a == pytest.approx(ga, rel=2e-3) and b == pytest.approx(gb, rel=2e-3), (trace, GOLDEN)
    # the output folder is what sample.py / eval.py load
    out = Path(cfg.out)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "latent_head.safetensors", "pca.safetensors",
                 "gap.json"):
        assert (out / name).exists(), name
    gap = json.loads((out / "gap.json").read_text())
    assert gap["latent_head"] == "pca" and gap["n_latents"] == 36 and gap["vision_norm"] > 0


def test_latent_loss_sum_is_eq2_as_written(syn, tmp_path):
    """--latent-loss sum: the same first step, with each latent's squared error summed over d (d x the default)."""
    cfg = cfg_for(syn, tmp_path / "sum", tau=1.0, latent_loss="sum", stop_after=1)
    train.main(cfg)
    (row,) = metrics(cfg.out)
    assert row["latent_loss"] == pytest.approx(34.0837, rel=2e-3)
    assert row["latent_loss"] / 128 == pytest.approx(GOLDEN[0][1], rel=2e-3) and row["lm_loss"] == pytest.approx(
        GOLDEN[0][0], rel=2e-3)
    with pytest.raises(SystemExit):
        train.parse_args(["--latent-loss", "max"])


def test_strip_by_tau(syn):
    data = syn / "prepared"
    keep_all, strip = train.Records(data, tau=1.0), train.Records(data, tau=0.0)
    assert not any(keep_all.strip)
    accs = [r.get("accuracy") for r in strip.records]
    assert strip.strip == [a is not None and a > 0.0 for a in accs]
    assert any(strip.strip) and not all(strip.strip)
    i = strip.strip.index(True)
    full, stripped = keep_all.get(i), strip.get(i)
    lat_ids = torch.tensor([strip.start_id, strip.pad_id, strip.end_id])
    assert torch.isin(full["input_ids"], lat_ids).any() and full["targets"] is not None
    assert not torch.isin(stripped["input_ids"], lat_ids).any() and stripped["targets"] is None
    keep = ~torch.isin(full["input_ids"], lat_ids)
    assert torch.equal(stripped["input_ids"], full["input_ids"][keep])   # text (incl. <parser>) is kept as is
    assert torch.equal(stripped["labels"], full["labels"][keep])
    j = strip.strip.index(False)
    n = int((strip.get(j)["input_ids"] == strip.pad_id).sum())
    assert strip.get(j)["targets"].shape == (n, 128)


def test_resume_is_exact(syn, tmp_path):
    a = cfg_for(syn, tmp_path / "a", scheduled_sampling=0.5)
    train.main(a)
    b = cfg_for(syn, tmp_path / "b", scheduled_sampling=0.5, stop_after=3)
    train.main(b)
    assert not (Path(b.out) / "model.safetensors").exists()
    train.main(cfg_for(syn, tmp_path / "b", scheduled_sampling=0.5, resume=True))
    wa, wb = load_file(Path(a.out) / "model.safetensors"), load_file(Path(b.out) / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0, msg=k)
    ha = load_file(Path(a.out) / "latent_head.safetensors")
    hb = load_file(Path(b.out) / "latent_head.safetensors")
    for k in ha:
        torch.testing.assert_close(ha[k], hb[k], rtol=0, atol=0, msg=k)
    assert [r["lm_loss"] for r in metrics(a.out)] == [r["lm_loss"] for r in metrics(b.out)]   # appended on resume


@pytest.fixture(scope="module")
def one_rank(syn, tmp_path_factory):
    cfg = cfg_for(syn, tmp_path_factory.mktemp("one"), epochs=1, repa_layer=2, repa_weight=0.5)
    train.main(cfg)
    return cfg


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_equal_one(syn, one_rank, tmp_path, mode):
    """2 gloo ranks (DDP with no_sync accumulation, or FSDP2 sharding per block) == 1 rank, same global batch."""
    one = one_rank
    args = [f"--data={one.data}", f"--model={one.model}", f"--out={tmp_path / 'two'}", "--global-batch=4",
            "--micro-batch=1", "--lr=2e-3", "--head-lr=2e-3", "--epochs=1", "--device=cpu", "--repa-layer=2",
            "--repa-weight=0.5", *(["--fsdp"] if mode == "fsdp" else [])]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(ROOT / "train.py"), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    w1, w2 = load_file(Path(one.out) / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-4, atol=1e-5, msg=k)
    h1, h2 = load_file(Path(one.out) / "latent_head.safetensors"), load_file(tmp_path / "two" / "latent_head.safetensors")
    for k in h1:
        torch.testing.assert_close(h1[k], h2[k], rtol=1e-4, atol=1e-5, msg=k)
    m1, m2 = metrics(one.out), metrics(tmp_path / "two")
    assert len(m1) == len(m2)
    for x, y in zip(m1, m2):
        assert x["lm_loss"] == pytest.approx(y["lm_loss"], rel=1e-5)
        assert x["valr_loss"] == pytest.approx(y["valr_loss"], rel=1e-4)


def test_bad_inputs(syn, tmp_path):
    with pytest.raises(FileNotFoundError, match="prepare.py synthetic"):
        train.main(cfg_for(syn, tmp_path, data=str(tmp_path / "synthetic" / "nothing")))
    with pytest.raises(ValueError, match="records < --global-batch 4096"):
        train.main(cfg_for(syn, tmp_path, global_batch=4096))
    with pytest.raises(ValueError, match="must split into"):
        train.main(cfg_for(syn, tmp_path, global_batch=4, micro_batch=3))
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 0, batch ids \["):
        train.main(cfg_for(syn, tmp_path / "nan", lambda_latent=1e39, tau=1.0))
    with pytest.raises(FileNotFoundError, match="--resume: no checkpoint"):
        train.main(cfg_for(syn, tmp_path / "fresh", resume=True))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "manifest.json").write_text((syn / "prepared" / "manifest.json").read_text())
    (bad / "records.jsonl").write_text(json.dumps({"id": "x", "image": "y.png", "input_ids": [1, 2]}) + "\n")
    with pytest.raises(ValueError, match=r"records.jsonl line 1: labels: expected a value, found it missing"):
        train.Records(bad, tau=0.0)


def test_activation_checkpointing_is_exact(syn, tmp_path):
    runs = []
    for ac in (False, True):
        cfg = cfg_for(syn, tmp_path / f"ac{ac}", tau=1.0, stop_after=2, activation_checkpointing=ac)
        train.main(cfg)
        runs.append([v for r in metrics(cfg.out) for v in (r["lm_loss"], r["latent_loss"], r["grad_norm"])])
    assert runs[0] == pytest.approx(runs[1], rel=1e-6)


@pytest.mark.parametrize("kind", ["full", "raw"])
def test_other_heads_train_and_load_in_sample(syn, tmp_path, kind):
    """The ablation heads train through the same loop, and sample.py loads what train.py exports for them."""
    import sample
    cfg = cfg_for(syn, tmp_path / kind, tau=1.0, epochs=1, latent_head=kind)
    train.main(cfg)
    assert all(r["n_latents"] > 0 for r in metrics(cfg.out))
    bundle = sample.load(cfg.out)
    assert bundle.kind == kind and (kind == "raw") != (Path(cfg.out) / "latent_head.safetensors").exists()
    rec = json.loads((syn / "raw" / "test.jsonl").read_text().splitlines()[0])
    row = sample.generate(bundle, [syn / "raw" / rec["image"]], [rec["question"]], mode=kind, max_new_tokens=6)[0]
    assert row["n_generated"] <= 6
