"""The tile miniature: a synthetic world small enough for a CPU, in which GAP's latent loop has a job to do.

    python prepare.py synthetic --task base --out data/tiles-base --latents 4      # base data + a random base model
    python train.py --data data/tiles-base/prepared --model data/tiles-base/model --out BASE --latent-head raw ...
    python prepare.py synthetic --task tiles --out data/tiles --latents 4          # the demo's raw/ split
    python prepare.py score --data data/tiles/raw/train.jsonl --model BASE --samples 8 --out F.scored.jsonl
    make base / make demo                                                          # the whole recipe, with its flags

Every question image is a 2x2 grid of 28x28 tiles (56x56 pixels, so each tile is exactly one merged image token).
A tile's top half shows its colour (the four are distinct); its bottom half is a *mark*: a dark shade of the colour of
another tile, the one it points to. Each 14x14 patch is one flat colour, and colours and marks never share a shade,
so "which tile is red" and "where does it point" are separate features of one token. Questions:

- warm-ups that need no search, on a flat image: `plain` ("What colour is the image?") and `shade` ("Which colour is
  this a shade of?", the mark-to-name lookup that reading a latent span needs).
- single hop, `point`: "Where does the red tile point?" -- find the red tile by content, read its mark.
- two hops, `follow`: "Start at the red tile and follow its mark. Where does the next tile point?" Hop 1 finds the
  red tile and reads its mark m; hop 2 finds the tile whose colour m names and reads *its* mark. The auxiliary image
  is the result of hop 1 -- the red tile zoomed to 28 * sqrt(N) pixels: its colour in the top latents, its mark in
  the bottom ones -- so the latent span is the intermediate step, and the `<parser>` text names the operation, never
  a colour. Answering the single-hop question instead is always wrong: no tile points to itself.

The base model learns the warm-ups and the single hop; it never sees two hops. `accuracy` is not set here: the base
scores the demo data (`prepare.py score`, 8 samples) and tau = 0 keeps latent spans only where it never succeeds.
"""
import random
from dataclasses import replace

from PIL import Image, ImageDraw

import model
import prepare
from prepare import LATENT_PLACEHOLDER

COLORS = {"red": (220, 40, 40), "green": (30, 170, 60), "blue": (40, 90, 230), "yellow": (235, 200, 30)}
MARKS = {"red": (110, 0, 30), "green": (0, 80, 20), "blue": (10, 10, 110), "yellow": (120, 100, 0)}   # dark shades
TILE = 28              # pixels per tile: one merged 28x28 image token (2x2 patches of 14x14)

# base data: flat-image warm-ups, then the single-hop search the two-hop task is built from
BASE_MIX = (("plain", 1), ("shade", 1), ("point", 2))
# demo data: single-hop questions (the base solves them: text only under tau = 0) and two-hop ones
TILES_MIX = (("point", 1), ("follow", 2))


# ---- the world: a 2x2 grid of tiles ----


def make_grid(rng):
    """-> (colours, points): four distinct colours in raster order, and for each tile the index of another tile."""
    colours = rng.sample(sorted(COLORS), 4)
    points = [rng.choice([j for j in range(4) if j != i]) for i in range(4)]
    return colours, points


def draw_tile(draw, x0, y0, side, colour, mark):
    """A tile: its colour on the top half, the mark (a dark shade of the colour it points to) on the bottom half."""
    draw.rectangle([x0, y0, x0 + side - 1, y0 + side // 2 - 1], fill=COLORS[colour])
    draw.rectangle([x0, y0 + side // 2, x0 + side - 1, y0 + side - 1], fill=MARKS[mark])


def render(colours, points):
    img = Image.new("RGB", (2 * TILE, 2 * TILE))
    draw = ImageDraw.Draw(img)
    for i in range(4):
        draw_tile(draw, (i % 2) * TILE, (i // 2) * TILE, TILE, colours[i], colours[points[i]])
    return img


def zoom(colours, points, i, side):
    """The result of hop 1: tile i alone, drawn at side x side pixels (what a crop + zoom of the tile shows)."""
    img = Image.new("RGB", (side, side))
    draw_tile(ImageDraw.Draw(img), 0, 0, side, colours[i], colours[points[i]])
    return img


# ---- questions ----


def ask(kind, colours, points, rng, aux_side):
    """-> (question, response, answer, aux images) for one question kind on one grid. For the flat warm-ups the grid
    only supplies the colour; `flat` draws their image."""
    c = colours[0]
    if kind == "plain":
        return "What colour is the image?", f"<think>I look at the image.</think><answer>{c}</answer>", c, []
    if kind == "shade":
        return ("Which colour is this a shade of?", f"<think>I look at the shade.</think><answer>{c}</answer>", c, [])
    i = rng.randrange(4)
    a, b = colours[i], colours[points[i]]
    if kind == "point":
        return (f"Where does the {a} tile point?",
                f"<think>I read the mark of the {a} tile.</think><answer>{b}</answer>", b, [])
    if kind == "follow":
        answer = colours[points[points[i]]]      # hop 1: the tile i points to; hop 2: where that one points
        return (f"Start at the {a} tile and follow its mark. Where does the next tile point?",
                f"<think>I zoom into the {a} tile. {LATENT_PLACEHOLDER} <parser>the zoomed tile's mark names the next "
                f"tile; I read that tile's mark</parser></think><answer>{answer}</answer>",
                answer, [zoom(colours, points, i, aux_side)])
    raise ValueError(f"unknown question kind {kind!r}")


def flat(kind, colour):
    """The warm-ups' image: the whole 56x56 image in one colour (plain) or in one mark's shade (shade)."""
    return Image.new("RGB", (2 * TILE, 2 * TILE), (COLORS if kind == "plain" else MARKS)[colour])


def make_example(i, seed, raw, mix, n_latents):
    """Example i from its own RNG (independent of n): kind by the mix's weights, then a fresh grid."""
    rng = random.Random(seed * 1_000_003 + i)
    kinds = [k for k, w in mix for _ in range(w)]
    kind = kinds[i % len(kinds)]
    colours, points = make_grid(rng)
    q, resp, answer, auxes = ask(kind, colours, points, rng, TILE * round(n_latents ** 0.5))
    rid = f"{kind}-{i:05d}"
    img = flat(kind, colours[0]) if kind in ("plain", "shade") else render(colours, points)
    img.save(raw / "images" / f"{rid}.png")
    for j, aux in enumerate(auxes):
        aux.save(raw / "aux" / f"{rid}-{j}.png")
    return {"id": rid, "image": f"images/{rid}.png", "question": q, "response": resp,
            "aux_images": [f"aux/{rid}-{j}.png" for j in range(len(auxes))], "answer": answer, "category": kind}


def make_tokenizer():
    """The BPE trained on every word either stage can say (and the chat template's), so the base and the demo share
    one tokenizer."""
    rng, texts = random.Random(0), ["system\n" + prepare.SYSTEM_PROMPT, "user\n", "assistant\n", "\n"]
    for kind in ("plain", "shade", "point", "follow"):
        for _ in range(60):
            colours, points = make_grid(rng)
            q, resp, answer, _ = ask(kind, colours, points, rng, TILE)
            texts += [q, answer, *resp.split(LATENT_PLACEHOLDER)]
    return prepare.train_tokenizer(texts)


# ---- the base model's shape ----


def make_model(tok, seed):
    """The miniature's base before training: text hidden 128, 4 layers, 8 heads of 16 (M-RoPE (2, 3, 3)), 4 KV heads,
    SwiGLU 384; a 2-block ViT of width 64 (4 heads), random and frozen. More, smaller heads than the
    classic tiny model: each head can lock onto one tile's colour."""
    base = model.PRESETS["tiny"]
    text = replace(base.text, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=8,
                   num_key_value_heads=4, mrope_section=(2, 3, 3))
    vision = replace(base.vision, depth=2, hidden_size=64, intermediate_size=128, num_heads=4,
                     fullatt_block_indexes=(0, 1), out_hidden_size=text.hidden_size)
    return prepare.random_model(text, vision, tok, seed)
