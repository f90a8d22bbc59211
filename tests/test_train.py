"""train.py: losses go down (with a short golden trace), stripping by tau, DDP/FSDP == one rank, exact and crash-safe
resume, chunked loss, non-finite stop, data order and balancing, MFU, bad input."""
import dataclasses
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

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
                lr=2e-3, head_lr=2e-3, epochs=2, device="cpu", workers=0)
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
    assert all(r["latents_fed"] > 0 for r in rows)
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
    accs = strip.accuracy
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


def same_weights(a, b, exact=True):
    """The exported model and latent head of two runs: bit-identical, or within the 1-rank vs 2-rank tolerance."""
    tol = dict(rtol=0, atol=0) if exact else dict(rtol=1e-4, atol=1e-5)
    for name in ("model.safetensors", "latent_head.safetensors"):
        wa, wb = load_file(Path(a) / name), load_file(Path(b) / name)
        assert wa.keys() == wb.keys()
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], **tol, msg=f"{name}: {k}")


@pytest.fixture(scope="module")
def uninterrupted(syn, tmp_path_factory):
    cfg = cfg_for(syn, tmp_path_factory.mktemp("full"), scheduled_sampling=0.5)
    train.main(cfg)
    return cfg


def test_resume_is_exact(syn, uninterrupted, tmp_path, capsys):
    """--resume with no checkpoint yet starts at step 0; stop after 3 steps, --resume from the sharded checkpoint
    (with DataLoader workers): bit-identical weights, each step logged once."""
    b = cfg_for(syn, tmp_path / "b", scheduled_sampling=0.5, stop_after=3, workers=2, resume=True)
    train.main(b)
    assert "no complete checkpoint" in capsys.readouterr().out
    assert not (Path(b.out) / "model.safetensors").exists()
    assert train.latest_checkpoint(b.out)[0] == 3
    train.main(cfg_for(syn, tmp_path / "b", scheduled_sampling=0.5, resume=True, workers=2))
    same_weights(uninterrupted.out, b.out)
    assert [r["lm_loss"] for r in metrics(uninterrupted.out)] == [r["lm_loss"] for r in metrics(b.out)]


def run_with_kill_hook(cfg, where):
    """train.main(cfg) in a fresh interpreter whose GAP_TEST_KILL_AT hook SIGKILLs it at `where`. A fresh process,
    not a fork: forking pytest (torch's thread pools, threads left by earlier tests) can deadlock the child on a lock
    some other thread held at the fork."""
    code = "import json, sys, train; train.main(train.TrainConfig(**json.loads(sys.argv[1])))"
    env = {**os.environ, "GAP_TEST_KILL_AT": where, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code, json.dumps(dataclasses.asdict(cfg))], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("point", ["mid-save", "swap"])
def test_kill_9_during_a_save_then_resume(syn, uninterrupted, tmp_path, point):
    """SIGKILL inside the save of step 8 (after the shards are written / after the new folder is in place, before
    the old one is deleted): --resume takes the newest complete checkpoint with no cleanup by hand, and the result
    is bit-identical to the uninterrupted run, with every step logged exactly once."""
    out = tmp_path / "k"
    cfg = cfg_for(syn, out, scheduled_sampling=0.5, save_every=4)
    child = run_with_kill_hook(cfg, f"{point}:8")   # SIGKILL ends it like kill -9 ends a run
    assert child.returncode == -signal.SIGKILL, child.stderr
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    if point == "mid-save":    # the new one half-written under its temporary name, the old one whole
        assert names == ["step-00000004", "tmp-step-00000008"], names
    else:                      # both whole: the swap had renamed the new one in, the old one was not yet deleted
        assert names == ["step-00000004", "step-00000008"], names
    assert train.latest_checkpoint(out)[0] == (4 if point == "mid-save" else 8)
    train.main(cfg_for(syn, out, scheduled_sampling=0.5, save_every=4, resume=True, export_dtype="bf16"))
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000012"]   # leftovers cleared
    assert [r["step"] for r in metrics(out)] == list(range(1, 13))
    assert [r["lm_loss"] for r in metrics(uninterrupted.out)] == [r["lm_loss"] for r in metrics(out)]
    full, ours = load_file(Path(uninterrupted.out) / "model.safetensors"), load_file(out / "model.safetensors")
    for k in full:   # the export is bf16 here: the uninterrupted fp32 export, rounded, is the same bits
        assert ours[k].dtype == torch.bfloat16
        assert torch.equal(full[k].to(torch.bfloat16), ours[k]), k


def test_truncated_checkpoint_is_never_taken(syn, uninterrupted, tmp_path):
    """A folder without the files a finished save writes last, or under a temporary name, is ignored."""
    root = tmp_path / "checkpoints"
    shutil.copytree(Path(uninterrupted.out) / "checkpoints" / "step-00000012", root / "step-00000012")
    shutil.copytree(root / "step-00000012", root / "tmp-step-00000014")
    shutil.copytree(root / "step-00000012", root / "step-00000016")
    (root / "step-00000016" / ".metadata").unlink()          # killed before rank 0 wrote the metadata
    shutil.copytree(root / "step-00000012", root / "step-00000018")
    (root / "step-00000018" / "meta.json").unlink()
    assert train.latest_checkpoint(tmp_path) == (12, root / "step-00000012")
    assert train.latest_checkpoint(tmp_path / "nothing") is None


def test_chunked_supervised_loss_equals_full_cross_entropy():
    """lm_loss_sum (supervised rows only, fp32 softmax in chunks recomputed in backward) == F.cross_entropy over all
    (B*T, V) logits with ignore_index, in value and in the gradients of h and lm_head."""
    torch.manual_seed(0)
    B, T, D, V = 2, 13, 16, 50
    h = torch.randn(B * T, D, requires_grad=True)
    head = torch.nn.Linear(D, V, bias=False)
    labels = torch.randint(0, V, (B, T))
    labels[torch.rand(B, T) < 0.4] = -100
    full = F.cross_entropy(head(h).view(B, T, V)[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100,
                           reduction="sum")
    g_full = torch.autograd.grad(full, [h, head.weight])
    sup = F.pad(labels[:, 1:] != -100, (0, 1)).flatten()
    pos, tgt = sup.nonzero().squeeze(1), labels.flatten().roll(-1)[sup]
    for chunk in (3, 1024):
        ours = train.lm_loss_sum(head, h, pos, tgt, chunk=chunk)
        torch.testing.assert_close(ours, full, rtol=1e-6, atol=1e-5)
        for a, b in zip(torch.autograd.grad(ours, [h, head.weight]), g_full):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    empty = train.lm_loss_sum(head, h, pos[:0], tgt[:0], chunk=3)   # no supervised token: 0, still in the graph
    assert empty.item() == 0 and empty.requires_grad


@pytest.fixture(scope="module")
def one_rank(syn, tmp_path_factory):
    cfg = cfg_for(syn, tmp_path_factory.mktemp("one"), epochs=1, repa_layer=2, repa_weight=0.5)
    train.main(cfg)
    return cfg


def torchrun(*configs, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "tests" / "run_ranks.py"), *map(json.dumps, configs)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def poisoned_copy(syn, dst, cfg, step, micro, rank):
    """A copy of the prepared folder where the record that `rank` draws in micro-batch `micro` of `step` has
    infinite latent targets: that rank, and only that one, gets a non-finite loss. -> the record's id."""
    shutil.copytree(syn / "prepared", dst)
    recs = train.Records(dst, tau=cfg.tau)
    rid = recs.ids[train.step_plan(recs, cfg, step, 2)[micro][rank][0]]
    tensors = load_file(recs.where[rid])
    tensors[rid] = torch.full_like(tensors[rid], float("inf"))
    save_file(tensors, recs.where[rid])
    return rid


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_equal_one_and_resume_exactly(syn, one_rank, tmp_path, mode):
    """2 gloo ranks (DDP with no_sync accumulation and summed gradients, or FSDP2 per-block units with summed
    reduce-scatter) == 1 rank, same global batch; and stop + --resume from the sharded checkpoint == uninterrupted,
    bit for bit. One torchrun launch runs all of them; with DDP it then runs a copy of the data where one record's
    latent targets are inf: the rank that draws it gets a non-finite loss and both ranks stop at that step, before
    the optimizer step, naming the step, the rank, the micro-batch and its record ids."""
    base = dict(data=one_rank.data, model=one_rank.model, global_batch=4, micro_batch=1, lr=2e-3, head_lr=2e-3,
                epochs=1, device="cpu", repa_layer=2, repa_weight=0.5, workers=0, fsdp=mode == "fsdp")
    full, res, nan = str(tmp_path / "full"), str(tmp_path / "res"), tmp_path / "nan"
    runs = [{**base, "out": full}, {**base, "out": res, "stop_after": 2}, {**base, "out": res, "resume": True}]
    if mode == "ddp":
        poison = dict(base, data=str(tmp_path / "data"), out=str(nan), tau=1.0, save_every=1)
        rid = poisoned_copy(syn, tmp_path / "data", train.TrainConfig(**poison), step=1, micro=1, rank=1)
        runs.append(poison)
    r = torchrun(*runs)
    assert (r.returncode != 0) == (mode == "ddp"), r.stdout[-2000:] + r.stderr[-3000:]   # ddp: the stopped run
    same_weights(one_rank.out, full, exact=False)
    m1, m2 = metrics(one_rank.out), metrics(full)
    assert len(m1) == len(m2)
    for x, y in zip(m1, m2):
        assert x["lm_loss"] == pytest.approx(y["lm_loss"], rel=1e-5)
        assert x["valr_loss"] == pytest.approx(y["valr_loss"], rel=1e-4)
    same_weights(full, res)
    assert metrics(full) == [dict(r, tokens_per_s=x["tokens_per_s"]) for r, x in zip(metrics(res), metrics(full))]
    if mode == "ddp":
        msg = f"non-finite loss at step 1 (rank 1, micro-batch 1), batch ids ['{rid}']"
        for rank in (0, 1):
            assert f"rank {rank} stopped: {msg}" in r.stdout, r.stdout[-2000:]
        assert train.latest_checkpoint(nan)[0] == 1   # the last good checkpoint, intact


def test_bad_inputs(syn, tmp_path):
    with pytest.raises(FileNotFoundError, match="prepare.py synthetic"):
        train.main(cfg_for(syn, tmp_path, data=str(tmp_path / "synthetic" / "nothing")))
    with pytest.raises(ValueError, match="records < --global-batch 4096"):
        train.main(cfg_for(syn, tmp_path, global_batch=4096))
    with pytest.raises(ValueError, match="must split into"):
        train.main(cfg_for(syn, tmp_path, global_batch=4, micro_batch=3))
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 0 \(rank 0, micro-batch 0\), batch ids \["):
        train.main(cfg_for(syn, tmp_path / "nan", lambda_latent=1e39, tau=1.0))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "manifest.json").write_text((syn / "prepared" / "manifest.json").read_text())
    (bad / "records.jsonl").write_text(json.dumps({"id": "x", "image": "y.png", "input_ids": [1, 2]}) + "\n")
    with pytest.raises(ValueError, match=r"records.jsonl line 1: labels: expected a value, found it missing"):
        train.Records(bad, tau=0.0)


def test_activation_checkpointing_and_one_process_fsdp_are_exact(syn, tmp_path):
    """Recomputing blocks changes nothing; nor does FSDP2 in one process (a one-rank group it sets up itself)."""
    runs = []
    for kw in (dict(), dict(activation_checkpointing=True), dict(fsdp=True)):
        cfg = cfg_for(syn, tmp_path / str(len(runs)), tau=1.0, stop_after=2, **kw)
        train.main(cfg)
        runs.append([v for r in metrics(cfg.out) for v in (r["lm_loss"], r["latent_loss"], r["grad_norm"])])
    assert runs[0] == pytest.approx(runs[1], rel=1e-6)
    assert runs[0] == pytest.approx(runs[2], rel=1e-5)


@pytest.mark.parametrize("kind", ["full", "raw"])
def test_other_heads_train_and_load_in_sample(syn, tmp_path, kind):
    """The ablation heads train through the same loop, and sample.py loads what train.py exports for them."""
    import sample
    cfg = cfg_for(syn, tmp_path / kind, tau=1.0, epochs=1, latent_head=kind)
    train.main(cfg)
    assert all(r["latents_fed"] > 0 for r in metrics(cfg.out))
    bundle = sample.load(cfg.out)
    assert bundle.kind == kind and (kind == "raw") != (Path(cfg.out) / "latent_head.safetensors").exists()
    rec = json.loads((syn / "raw" / "test.jsonl").read_text().splitlines()[0])
    row = sample.generate(bundle, [syn / "raw" / rec["image"]], [rec["question"]], mode=kind, max_new_tokens=6)[0]
    assert row["n_generated"] <= 6


def batches_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if torch.is_tensor(a[k]):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def test_dataloader_order_is_the_reference_across_a_resume(syn):
    """Worker processes deliver exactly the micro-batches a single-process loop over (step, j) builds, in order,
    and a loader started at a later step (a resume) continues that same sequence."""
    cfg = cfg_for(syn, "unused", tau=0.0, micro_batch=1, workers=2)
    recs = train.Records(syn / "prepared", cfg.tau)
    vlm_cfg = train.model.Config.from_json(syn / "model" / "config.json")
    data = train.MicroBatches(recs, cfg, vlm_cfg, rank=1, world=2)   # rank 1 of 2: 2 micro-batches per step
    reference = [train.collate([recs.get(i) for i in train.step_plan(recs, cfg, s, 2)[j][1]], vlm_cfg, recs.pad_id,
                               recs.pixels) for s in range(4) for j in range(2)]
    for start in (0, 2):
        got = list(itertools.islice(train.loader(data, start, cfg, pin=False), 2 * (4 - start)))
        assert len(got) == 2 * (4 - start)
        for a, b in zip(got, reference[2 * start:]):
            batches_equal(a, b)


@pytest.mark.parametrize("world,micro", [(1, 4), (2, 1), (4, 1), (2, 2)])
def test_length_balancing_keeps_every_example_once(syn, world, micro):
    cfg = cfg_for(syn, "unused", global_batch=8, micro_batch=micro)
    recs = train.Records(syn / "prepared", tau=0.0)
    steps = len(recs) // cfg.global_batch
    for epoch in range(2):
        seen = []
        for s in range(epoch * steps, (epoch + 1) * steps):
            plan = train.step_plan(recs, cfg, s, world)
            assert len(plan) == cfg.global_batch // (world * micro) and all(len(p) == world for p in plan)
            assert all(len(idx) == micro for p in plan for idx in p)
            # accumulation step j holds the j-th slice of the batch sorted by length: no rank waits on a longer one
            lengths = [[recs.length[i] for idx in p for i in idx] for p in plan]
            assert all(min(a) >= max(b) for a, b in zip(lengths, lengths[1:]))
            seen += [i for p in plan for idx in p for i in idx]
        # exactly once each: the epoch's permutation cut to whole global batches (the < global_batch remainder
        # is left to the next epoch's permutation, as a plain sampler with drop_last does)
        perm = torch.randperm(len(recs), generator=torch.Generator().manual_seed(cfg.seed + epoch)).tolist()
        assert len(seen) == len(set(seen)) and set(seen) == set(perm[:steps * cfg.global_batch])
    assert train.step_plan(recs, cfg, 1, world) == train.step_plan(recs, cfg, 1, world)   # a function of the step


def test_mfu_flops_on_a_hand_computed_config():
    """d 8, 2 layers, 2 heads of 4, 1 KV head, ffn 16, vocab 10; sequences of 3 and 5 tokens, 4 supervised.
    Block matmul parameters: q 8x8 + k 8x4 + v 8x4 + o 8x8 + gate/up/down 3x8x16 = 576.
    6 x 2 x 576 x 8 tokens = 55296; lm_head 6 x 8 x 10 x 4 = 1920; attention 6 x 2 x 2 x 4 x (9 + 25) = 3264."""
    text = train.model.TextConfig(hidden_size=8, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                               intermediate_size=16, vocab_size=10)
    assert text.head_dim == 4
    assert train.train_flops(text, [3, 5], 4) == 55296 + 1920 + 3264
    assert train.peak_flops(torch.device("cpu")) is None
    assert dict(train.PEAK_FLOPS)["H100"] == 989e12 and dict(train.PEAK_FLOPS)["H100 PCIe"] == 756e12


def test_plain_ddp_refused_when_adamw_state_cannot_fit():
    with pytest.raises(prepare.DataError, match=r"8.3B trained parameters need 124 GiB .* than the 79 GiB of "
                                                r"NVIDIA H100 80GB HBM3: use --fsdp"):
        train.check_replica_fits("Qwen2.5-VL-7B", 8.3e9, 85e9, "NVIDIA H100 80GB HBM3")
    train.check_replica_fits("Qwen2.5-VL-3B-slice", 1e9, 85e9, "NVIDIA H100 80GB HBM3")   # 16 GB: fits


@pytest.mark.parametrize("cuda", [False, True])
def test_fsdp_units_and_precision_policy(syn, cuda):
    """train.shard's units on a 1-rank gloo group (built, not run, for the CUDA policy): blocks, embedding and
    [norm, lm_head] compute in bf16 with fp32 gradient reduction on CUDA (fp32 on CPU), the head in fp32, the frozen
    ViT outside every unit (plain tensors, not shards)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        vlm = train.model.load_pretrained(syn / "model")
        for p in vlm.visual.parameters():
            p.requires_grad_(False)
        head = train.lh.make_head("full", vlm.cfg.text.hidden_size)
        gap = train.GAP(vlm, head)
        train.shard(gap, cfg_for(syn, "unused"), cuda)
        bf16 = torch.bfloat16 if cuda else None
        policy = lambda mod: mod._get_fsdp_state()._mp_policy
        for unit in [*vlm.model.layers, vlm.model.embed_tokens, vlm.lm_head]:
            assert isinstance(unit, FSDPModule)
            assert policy(unit).param_dtype == bf16 and policy(unit).reduce_dtype == (torch.float32 if cuda else None)
        assert vlm.model.norm._get_fsdp_state() is vlm.lm_head._get_fsdp_state()   # one unit
        assert isinstance(head, FSDPModule) and policy(head).param_dtype is None
        assert all(isinstance(p, DTensor) for p in vlm.model.parameters())
        assert not any(isinstance(p, DTensor) for p in vlm.visual.parameters())
    finally:
        dist.destroy_process_group()
