"""The tile miniature (synthetic.py): the two-hop logic, what the aux image and the <parser> may and may not say, and
the base recipe end to end in a shortened form (base data -> base training, the ViT frozen -> demo data scored by the
base -> build with its ViT -> a GAP step). CPU, seconds.
    .venv/bin/python -m pytest -q tests/test_tiles.py
"""
import json
import random
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import model  # noqa: E402
import prepare  # noqa: E402
import synthetic  # noqa: E402
import train  # noqa: E402


def test_two_hop_answer_and_what_the_text_reveals():
    rng = random.Random(0)
    for _ in range(200):
        colours, points = synthetic.make_grid(rng)
        assert sorted(colours) == sorted(synthetic.COLORS) and all(p != i and 0 <= p < 4 for i, p in enumerate(points))
        q, resp, answer, auxes = synthetic.ask("follow", colours, points, rng, 56)
        start = next(i for i, c in enumerate(colours) if f"the {c} tile and" in q)
        middle = points[start]                                   # hop 1's result: the tile the start tile points to
        assert answer == colours[points[middle]]                 # hop 2 on it
        assert answer != colours[middle]                         # the single-hop answer is always wrong here
        parser = resp.split("<parser>")[1].split("</parser>")[0]
        assert not any(c in parser for c in synthetic.COLORS)    # names the operation, never a colour
        assert resp.count(synthetic.LATENT_PLACEHOLDER) == 1 and len(auxes) == 1
        # the aux image is the start tile zoomed: its colour on the top half, the mark of hop 1's tile below
        aux = auxes[0]
        assert aux.size == (56, 56)
        assert aux.getpixel((1, 1)) == aux.getpixel((54, 27)) == synthetic.COLORS[colours[start]]
        assert aux.getpixel((1, 28)) == aux.getpixel((54, 54)) == synthetic.MARKS[colours[middle]]
        q1, _, a1, aux1 = synthetic.ask("point", colours, points, rng, 56)
        assert aux1 == [] and a1 == colours[points[colours.index(q1.split("the ")[1].split(" tile")[0])]]


def test_render_puts_one_tile_per_image_token_and_one_colour_per_patch():
    colours, points = ["red", "green", "blue", "yellow"], [1, 2, 3, 0]
    img = synthetic.render(colours, points)
    assert img.size == (56, 56)   # 2x2 merged 28x28 tokens
    for i, (x, y) in enumerate(((0, 0), (28, 0), (0, 28), (28, 28))):
        for px in range(x, x + 28, 14):   # every 14x14 patch is one flat colour: the colour above, the mark below
            top, bottom = img.crop((px, y, px + 14, y + 14)), img.crop((px, y + 14, px + 14, y + 28))
            assert top.getcolors() == [(196, synthetic.COLORS[colours[i]])]
            assert bottom.getcolors() == [(196, synthetic.MARKS[colours[points[i]]])]
    assert not set(synthetic.COLORS.values()) & set(synthetic.MARKS.values())   # a colour is never a mark's shade


def test_committed_base_is_what_make_base_makes():
    """`make demo` starts from checkpoints/tiles-base: its tokenizer must be the one `make base` trains on today's
    texts, its shape make_model's, and its recorded held-out single-hop accuracy >= 0.9."""
    base = ROOT / "checkpoints" / "tiles-base"
    tok = synthetic.make_tokenizer()
    assert json.loads(tok.to_str())["model"] == json.loads((base / "tokenizer.json").read_text())["model"]
    committed, fresh = model.load_pretrained(base), synthetic.make_model(tok, 0)
    assert (committed.cfg.text, committed.cfg.vision) == (fresh.cfg.text, fresh.cfg.vision)
    res = json.loads((base / "eval" / "results.json").read_text())["intervention"][0]
    assert res["per_category"]["point"]["accuracy"] >= 0.9 and res["per_category"]["point"]["n"] >= 200
    assert "make base" in (base / "COMMAND").read_text()


def test_base_recipe_short(tmp_path):
    """`make base` + the demo's data steps, shortened: every stage runs and hands the next what it needs."""
    base = tmp_path / "base"
    prepare.main(["synthetic", "--task", "base", "--out", str(base), "--n", "24", "--latents", "4", "--device", "cpu"])
    man = json.loads((base / "prepared" / "manifest.json").read_text())
    assert man["n_spans"] == 0 and man["pca"] is None and man["n_kept"] == 19
    cats = {json.loads(line)["category"] for line in (base / "raw" / "train.jsonl").read_text().splitlines()}
    assert cats == {k for k, _ in synthetic.BASE_MIX}
    cfg = train.TrainConfig(data=str(base / "prepared"), model=str(base / "model"), out=str(tmp_path / "ckpt"),
                            latent_head="raw", global_batch=8, micro_batch=8, epochs=1, lr=1e-2, device="cpu")
    train.main(cfg)
    before, after = load_file(base / "model" / "model.safetensors"), load_file(tmp_path / "ckpt" / "model.safetensors")
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(before[q], after[q])
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("visual."))   # the ViT stays frozen

    tiles = tmp_path / "tiles"
    prepare.main(["synthetic", "--task", "tiles", "--out", str(tiles), "--n", "10", "--latents", "4"])
    assert not (tiles / "prepared").exists()   # accuracy comes from the base, not from the generator
    with pytest.raises(prepare.DataError, match="--layout text expects no <latent>, found 1"):
        prepare.main(["build", "--data", str(tiles / "raw" / "train.jsonl"), "--model", str(tmp_path / "ckpt"),
                      "--out", str(tmp_path / "bad"), "--layout", "text", "--latents", "4"])
    scored = tiles / "raw" / "train.scored.jsonl"
    prepare.main(["score", "--data", str(tiles / "raw" / "train.jsonl"), "--model", str(tmp_path / "ckpt"),
                  "--samples", "2", "--max-new-tokens", "8", "--out", str(scored), "--device", "cpu"])
    recs = [json.loads(line) for line in scored.read_text().splitlines()]
    assert len(recs) == 8 and all(0.0 <= r["accuracy"] <= 1.0 for r in recs)
    assert prepare.solved_summary(recs, 2) == prepare.solved_summary(recs[::-1], 2)   # order-free, one line
    rows = [{"category": "follow", "accuracy": 0.0}, {"category": "follow", "accuracy": 0.5},
            {"category": "point", "accuracy": 1.0}, {"accuracy": 0.0}]
    assert prepare.solved_summary(rows, 8) == ("score: solved at least once in 8 samples: all 0/1, follow 1/2, point "
                                               "1/1 (the other 2 scored 0: tau = 0 keeps their latent spans)")
    prepare.main(["build", "--data", str(scored), "--model", str(tmp_path / "ckpt"), "--out", str(tiles / "prepared"),
                  "--latents", "4", "--device", "cpu"])
    man = json.loads((tiles / "prepared" / "manifest.json").read_text())
    assert man["n_spans"] == sum(r["category"] == "follow" for r in recs) > 0 and man["pca"]["k"] >= 1
    gap = train.TrainConfig(data=str(tiles / "prepared"), model=str(tmp_path / "ckpt"), out=str(tmp_path / "gap"),
                            tau=1.0, global_batch=4, micro_batch=4, epochs=1, device="cpu", stop_after=1)
    train.main(gap)
    row = json.loads((tmp_path / "gap" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["latents_fed"] > 0 and row["latent_loss"] > 0
