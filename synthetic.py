"""The tile miniature: a synthetic world small enough for a CPU, in which GAP's latent loop has a job to do.

    python prepare.py synthetic --task base --out data/tiles-base --latents 4      # base data + a random base model
    python train.py --data data/tiles-base/prepared --model data/tiles-base/model --out BASE --latent-head raw ...
    python prepare.py synthetic --task tiles --out data/tiles --latents 4          # the demo's raw/ split
    python prepare.py score --data data/tiles/raw/train.jsonl --model BASE --samples 8 --out F.scored.jsonl
    make base / make demo                                                          # the whole recipe, with its flags

Every question image is a 2x2 grid of 28x28 tiles (56x56 pixels, so each tile is exactly one merged image token).
A tile has a background colour (the four are distinct) and a small centre square whose colour names one of the
other three tiles. Questions:

- single hop, `inside`: "What colour is inside the red tile?" -- find the tile by content, read its centre. The base
  model is trained on it, with warm-ups that need no search (`plain`: the whole image in one colour; `colour` and
  `centre`: a tile named by its position).
- two hops, `follow`: "Start at the red tile and follow its centre colour. What colour is inside the next tile?"
  Hop 1 selects the red tile; hop 2 takes its centre colour c, selects the tile whose background is c and reads that
  tile's centre. The auxiliary image is the result of hop 1 -- the red tile zoomed to 28 * sqrt(N) pixels -- so the
  latent span is the intermediate step, and the `<parser>` text names the operation, never the intermediate colour
  nor the answer. A model that answers the single-hop question instead is always wrong: a centre never has its own
  tile's background colour.

`accuracy` is not set here: the base model scores the data (`prepare.py score`, 8 samples) and tau = 0 keeps latent
spans only where it never succeeds.
"""
import random
from dataclasses import replace

from PIL import Image, ImageDraw

import model
import prepare
from prepare import LATENT_PLACEHOLDER

COLORS = {"red": (220, 40, 40), "green": (30, 150, 60), "blue": (40, 80, 220), "yellow": (225, 190, 20),
          "purple": (140, 60, 180), "orange": (240, 130, 30)}
PLACES = ("top left", "top right", "bottom left", "bottom right")   # raster order = image-token order
TILE = 28              # pixels per tile: one merged 28x28 image token
CENTRE = 12            # side of the centre square; it spans all four 14x14 patches of its tile

# base data: warm-ups that need no search (the whole image in one colour; a tile named by its position), then the
# single-hop search the two-hop task is built from
BASE_MIX = (("plain", 1), ("colour", 1), ("centre", 1), ("inside", 2))
# demo data: single-hop questions (the base solves them: text only under tau = 0) and two-hop ones
TILES_MIX = (("inside", 1), ("follow", 2))


# ---- the world: a 2x2 grid of tiles ----


def make_grid(rng):
    """-> (backgrounds, centres): four distinct colours, and for each tile the background of another tile."""
    bg = rng.sample(sorted(COLORS), 4)
    centre = [bg[rng.choice([j for j in range(4) if j != i])] for i in range(4)]
    return bg, centre


def draw_tile(draw, x0, y0, side, bg, centre):
    s = side * CENTRE // TILE   # the centre square scales with the tile: 12 px at 28, 24 px zoomed to 56
    c = (side - s) // 2
    draw.rectangle([x0, y0, x0 + side - 1, y0 + side - 1], fill=COLORS[bg])
    draw.rectangle([x0 + c, y0 + c, x0 + c + s - 1, y0 + c + s - 1], fill=COLORS[centre])


def render(bg, centre):
    img = Image.new("RGB", (2 * TILE, 2 * TILE))
    draw = ImageDraw.Draw(img)
    for i in range(4):
        draw_tile(draw, (i % 2) * TILE, (i // 2) * TILE, TILE, bg[i], centre[i])
    return img


def zoom(bg, centre, i, side):
    """The result of hop 1: tile i alone, drawn at side x side pixels (what a crop + zoom of the tile shows)."""
    img = Image.new("RGB", (side, side))
    draw_tile(ImageDraw.Draw(img), 0, 0, side, bg[i], centre[i])
    return img


# ---- questions ----


def ask(kind, bg, centre, rng, aux_side):
    """-> (question, response, answer, aux images) for one question kind on one grid."""
    if kind == "plain":   # drawn on a plain grid (all tiles alike): every image token carries the answer
        return "What colour is the image?", f"<think>I look at the image.</think><answer>{bg[0]}</answer>", bg[0], []
    if kind == "colour":
        i = rng.randrange(4)
        return (f"What colour is the {PLACES[i]} tile?",
                f"<think>I look at the {PLACES[i]} tile.</think><answer>{bg[i]}</answer>", bg[i], [])
    if kind == "centre":
        i = rng.randrange(4)
        return (f"What colour is inside the {PLACES[i]} tile?",
                f"<think>I look inside the {PLACES[i]} tile.</think><answer>{centre[i]}</answer>", centre[i], [])
    i = rng.randrange(4)
    if kind == "inside":
        return (f"What colour is inside the {bg[i]} tile?",
                f"<think>I look inside the {bg[i]} tile.</think><answer>{centre[i]}</answer>", centre[i], [])
    if kind == "follow":
        j = bg.index(centre[i])                  # hop 1: the tile the start tile's centre names
        answer = centre[j]                       # hop 2: that tile's centre
        return (f"Start at the {bg[i]} tile and follow its centre colour. What colour is inside the next tile?",
                f"<think>I zoom into the {bg[i]} tile. {LATENT_PLACEHOLDER} <parser>the zoomed tile's centre names "
                f"the next tile; I look inside that one</parser></think><answer>{answer}</answer>",
                answer, [zoom(bg, centre, i, aux_side)])
    raise ValueError(f"unknown question kind {kind!r}")


def make_example(i, seed, raw, mix, n_latents):
    """Example i from its own RNG (independent of n): kind by the mix's weights, then a fresh grid."""
    rng = random.Random(seed * 1_000_003 + i)
    kinds = [k for k, w in mix for _ in range(w)]
    kind = kinds[i % len(kinds)]
    bg, centre = make_grid(rng)
    if kind == "plain":
        bg, centre = [bg[0]] * 4, [centre[0]] * 4
    q, resp, answer, auxes = ask(kind, bg, centre, rng, TILE * round(n_latents ** 0.5))
    rid = f"{kind}-{i:05d}"
    render(bg, centre).save(raw / "images" / f"{rid}.png")
    for j, aux in enumerate(auxes):
        aux.save(raw / "aux" / f"{rid}-{j}.png")
    return {"id": rid, "image": f"images/{rid}.png", "question": q, "response": resp,
            "aux_images": [f"aux/{rid}-{j}.png" for j in range(len(auxes))], "answer": answer, "category": kind}


def tokenizer_texts():
    """Every word either stage can say, so the base and the demo share one tokenizer."""
    rng, texts = random.Random(0), []
    for kind in ("plain", "colour", "centre", "inside", "follow"):
        for _ in range(60):
            bg, centre = make_grid(rng)
            q, resp, answer, _ = ask(kind, bg, centre, rng, TILE)
            texts += [q, answer, *resp.split(LATENT_PLACEHOLDER)]
    return texts


# ---- the base model's shape ----


def make_model(tok, seed):
    """The miniature's base before training: text hidden 128, 4 layers, 8 heads of 16 (M-RoPE (2, 3, 3)), 4 KV heads,
    SwiGLU 384; a 2-block ViT of width 64 (4 heads) that the base stage trains too. More, smaller heads than the
    classic tiny model: each head can lock onto one tile's colour."""
    base = model.PRESETS["tiny"]
    text = replace(base.text, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=8,
                   num_key_value_heads=4, mrope_section=(2, 3, 3))
    vision = replace(base.vision, depth=2, hidden_size=64, intermediate_size=128, num_heads=4,
                     fullatt_block_indexes=(0, 1), out_hidden_size=text.hidden_size)
    return prepare.random_model(text, vision, tok, seed)
