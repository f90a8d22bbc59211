"""convert.py: hand-made Monet-SFT and LVR box samples -> the expected gap records -> build -> two train steps.

    .venv/bin/python -m pytest -q tests/test_convert.py

The samples follow the public layouts cited in convert.py (Monet's src/task.py, LVR's README); nothing is downloaded.
The tiny model comes from the session's synthetic run (conftest.py's `syn`).
"""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import convert
import prepare
import train


def _image(path, w, h, seed):
    """Random RGB noise: every crop of it is different, so a wrong box cannot pass for a right one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def _records(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _text(t):
    return {"type": "text", "text": t}


def _img(p):
    return {"type": "image", "image_file_name": p}


SYSTEM = {"role": "system", "content": [_text("You are a helpful assistant. You can generate abstract visual tokens "
                                               "... put them in <abs_vis_token>...</abs_vis_token>.")]}


def monet_sample(root):
    """Two records in Monet-SFT-125K's layout: one with two aux images and observations, one with no observation."""
    for name, (w, h), seed in (("q0", (112, 84), 1), ("a0", (60, 60), 2), ("a1", (40, 50), 3), ("q1", (84, 112), 4),
                               ("a2", (56, 56), 5)):
        _image(root / "Visual_CoT" / "images" / f"{name}.png", w, h, seed)
    im = lambda n: f"Visual_CoT/images/{n}.png"
    return [
        {"metadata": {"dataset_name": "Visual_CoT", "sample_id": 0}, "data": [
            SYSTEM,
            {"role": "user", "content": [_img(im("q0")), _text("What does the small sign say? Put your final "
                                                               "answer within \\boxed{}.")]},
            {"role": "assistant", "content": [
                _text("I need to zoom in on the sign. <abs_vis_token></abs_vis_token>"), _img(im("a0")),
                _text("<observation>The zoomed view shows a red sign.</observation> Now its text. "
                      "<abs_vis_token></abs_vis_token>"), _img(im("a1")),
                _text("<observation>It reads STOP.</observation> So the answer is \\boxed{STOP}")]}]},
        {"metadata": {"dataset_name": "Zebra_CoT_count", "sample_id": 7}, "data": [
            SYSTEM,
            {"role": "user", "content": [_img(im("q1")), _text("How many dots are there?")]},
            {"role": "assistant", "content": [
                _text("Let me isolate the dots. <abs_vis_token></abs_vis_token>"), _img(im("a2")),
                _text("Counting them gives three. \\boxed{3}")]}]},
    ]


def monet_expected(root):
    """What the two records above must become (absolute paths)."""
    im = lambda n: str((root / "Visual_CoT" / "images" / f"{n}.png").absolute())
    return [
        {"id": "Visual_CoT-0", "image": im("q0"),
         "question": "What does the small sign say? Put your final answer within \\boxed{}.",
         "response": "<think>I need to zoom in on the sign. <latent><parser>The zoomed view shows a red sign."
                     "</parser> Now its text. <latent><parser>It reads STOP.</parser> So the answer is "
                     "\\boxed{STOP}</think><answer>STOP</answer>",
         "aux_images": [im("a0"), im("a1")], "answer": "STOP", "accuracy": None},
        {"id": "Zebra_CoT_count-7", "image": im("q1"), "question": "How many dots are there?",
         "response": "<think>Let me isolate the dots. <latent>Counting them gives three. \\boxed{3}</think>"
                     "<answer>3</answer>",
         "aux_images": [im("a2")], "answer": "3", "accuracy": None},
    ]


def bbox_sample(root):
    """LVR's stage-1 layout: one box with the answer in <answer>; two boxes with reasoning around each <lvr>; a record
    with two question images, which gap cannot hold (dropped and reported); and Visual-CoT's own layout."""
    _image(root / "viscot" / "flickr30k" / "1.png", 120, 80, 6)
    _image(root / "viscot" / "gqa" / "2.png", 100, 100, 7)
    return [
        {"dataset": "flickr30k", "split": "train", "question_id": 31593, "image": ["viscot/flickr30k/1.png"],
         "conversations": [{"from": "human", "value": "<image>\nWhat is written on the sign?"},
                           {"from": "gpt", "value": "<lvr>\n<answer> STOP </answer>"}],
         "bboxes": [[0.25, 0.5, 0.75, 1.0]]},
        {"id": "gqa-9", "image": "viscot/gqa/2.png",
         "conversations": [{"from": "human", "value": "<image>\nIs the cup left of the plate?"},
                           {"from": "gpt", "value": "First the cup <lvr> then the plate <lvr> <answer>yes</answer>"}],
         "bboxes": [[0.0, 0.0, 0.5, 0.5], [50, 50, 100, 100]]},   # the second in pixels, as LVR's loader allows
        {"id": "two-images", "image": ["viscot/gqa/2.png", "viscot/gqa/2.png"],
         "conversations": [{"from": "human", "value": "<image>\n<image>\nSame?"}, {"from": "gpt", "value": "yes"}],
         "bboxes": [[0.1, 0.1, 0.2, 0.2]]},
        {"dataset": "gqa", "split": "train", "question_id": 7,
         "image": ["viscot/gqa/2.png", "viscot/gqa/2.png###[10, 20, 60, 90]"],
         "conversations": [{"from": "human", "value": "<image>\nWhat is on the table? Please provide the bounding box "
                                                      "coordinate of the region that can help you answer the question "
                                                      "better."},
                           {"from": "gpt", "value": "[0.100, 0.200, 0.600, 0.900]"},
                           {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a cup"}]},
    ]


def _region(x0, y0, x1, y1):
    return f"<latent> <parser>the region [{x0:.2f}, {y0:.2f}, {x1:.2f}, {y1:.2f}] of the image, zoomed in</parser>"


def bbox_expected(root, crops):
    im, crop = lambda p: str((root / "viscot" / p).absolute()), lambda n: str((crops / n).absolute())
    return [
        {"id": "flickr30k-31593", "image": im("flickr30k/1.png"), "question": "What is written on the sign?",
         "response": f"<think>{_region(0.25, 0.5, 0.75, 1)}</think><answer>STOP</answer>",
         "aux_images": [crop("0000000-0.png")], "answer": "STOP", "accuracy": None},
        {"id": "gqa-9", "image": im("gqa/2.png"), "question": "Is the cup left of the plate?",
         "response": f"<think>First the cup {_region(0, 0, 0.5, 0.5)} then the plate {_region(0.5, 0.5, 1, 1)}"
                     "</think><answer>yes</answer>",
         "aux_images": [crop("0000001-0.png"), crop("0000001-1.png")], "answer": "yes", "accuracy": None},
        {"id": "gqa-7", "image": im("gqa/2.png"), "question": "What is on the table?",
         "response": f"<think>{_region(0.1, 0.2, 0.6, 0.9)}</think><answer>a cup</answer>",
         "aux_images": [crop("0000003-0.png")], "answer": "a cup", "accuracy": None},
    ]
BBOX_CROPS = {"0000000-0.png": ("flickr30k/1.png", (30, 40, 90, 80)), "0000001-0.png": ("gqa/2.png", (0, 0, 50, 50)),
              "0000001-1.png": ("gqa/2.png", (50, 50, 100, 100)),
              "0000003-0.png": ("gqa/2.png", (10, 20, 60, 90))}   # Visual-CoT's box: pixels, after "###"


def _convert(tmp_path, layout, recs, name, jsonl=False):
    data = tmp_path / layout / f"{name}.json"
    text = "".join(json.dumps(r) + "\n" for r in recs) if jsonl else json.dumps(recs, indent=2)
    data.write_text(text)
    out = tmp_path / "out" / f"{name}.jsonl"
    opts = convert.ConvertOptions(data=str(data), images=str(tmp_path / layout), out=str(out),
                                  source="monet" if layout == "monet" else "bbox")
    return convert.convert(opts), out


def _build_and_train(syn, tmp_path, data, n_records, n_spans):
    man = prepare.build(prepare.BuildOptions(data=str(data), model=str(syn / "model"), out=str(tmp_path / "prep"),
                                             device="cpu"))
    assert man["n_kept"] == man["n_records"] == n_records and man["skipped"] == [] and man["n_spans"] == n_spans
    cfg = train.TrainConfig(data=str(tmp_path / "prep"), model=str(syn / "model"), out=str(tmp_path / "run"),
                            global_batch=1, micro_batch=1, epochs=1, lr=1e-3, head_lr=1e-3, device="cpu")
    train.main(cfg)   # global batch 1: one optimizer step per record
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == n_records and all(np.isfinite(r["lm_loss"]) and np.isfinite(r["latent_loss"]) for r in rows)
    assert sum(r["latents_fed"] for r in rows) == 36 * n_spans   # accuracy null: no span is stripped


# ---- the two layouts, end to end ----


def test_monet_converts_builds_trains(syn, tmp_path):
    res, out = _convert(tmp_path, "monet", monet_sample(tmp_path / "monet"), "train")
    assert res == {"kept": 2, "dropped": []} and _records(out) == monet_expected(tmp_path / "monet")
    assert (out.parent / "train.jsonl.dropped").read_text() == "" and not list(out.parent.glob("*.tmp"))
    _build_and_train(syn, tmp_path, out, n_records=2, n_spans=3)


def test_bbox_converts_crops_builds_trains(syn, tmp_path, capsys):
    res, out = _convert(tmp_path, "lvr", bbox_sample(tmp_path / "lvr"), "lvr")
    assert _records(out) == bbox_expected(tmp_path / "lvr", out.parent / "lvr-crops")
    start = next(i for i, x in enumerate((tmp_path / "lvr" / "lvr.json").read_text().splitlines()) if "two-images" in x)
    drop = {"line": start, "id": "two-images", "field": "image", "reason": "expected 1 question image, found 2"}
    assert res == {"kept": 3, "dropped": [drop]} and _records(str(out) + ".dropped") == [drop]
    err = capsys.readouterr().err
    assert f"dropped: {tmp_path}/lvr/lvr.json line {start} (id two-images): image: expected 1 question image" in err
    for name, (src, box) in BBOX_CROPS.items():   # each aux image is exactly the box's crop of the question image
        crop = np.asarray(Image.open(out.parent / "lvr-crops" / name))
        assert np.array_equal(crop, np.asarray(Image.open(tmp_path / "lvr" / "viscot" / src).crop(box))), name
    assert sorted(p.name for p in (out.parent / "lvr-crops").iterdir()) == sorted(BBOX_CROPS)
    _build_and_train(syn, tmp_path, out, n_records=3, n_spans=4)


def test_ids_stable_and_jsonl_input(tmp_path):
    """JSONL input gives the same records as the JSON array; a record without metadata gets "<folder>-<index>"."""
    recs = monet_sample(tmp_path / "monet")
    del recs[1]["metadata"]
    _, a = _convert(tmp_path, "monet", recs, "array")
    _, b = _convert(tmp_path, "monet", recs, "lines", jsonl=True)
    assert _records(a) == _records(b) and [r["id"] for r in _records(a)] == ["Visual_CoT-0", "monet-1"]
    recs[1]["metadata"] = recs[0]["metadata"]   # two records, one id: the second is dropped, not overwritten
    res, _ = _convert(tmp_path, "monet", recs, "dup")
    assert res["kept"] == 1 and res["dropped"][0]["field"] == "id" and "duplicate" in res["dropped"][0]["reason"]


def test_unusable_monet_records_are_dropped_with_reason(tmp_path):
    recs = monet_sample(tmp_path / "monet")
    no_marker, no_answer, missing = (json.loads(json.dumps(recs[1])) for _ in range(3))
    no_marker["data"][2]["content"][0]["text"] = "Let me isolate the dots."
    no_answer["data"][2]["content"][2]["text"] = "Counting them gives three."
    missing["data"][2]["content"][1]["image_file_name"] = "Visual_CoT/images/nope.png"
    for i, r in enumerate((no_marker, no_answer, missing)):
        r["metadata"]["sample_id"] = 10 + i
    res, out = _convert(tmp_path, "monet", [recs[0], no_marker, no_answer, missing], "bad")
    assert res["kept"] == 1 and [r["id"] for r in _records(out)] == ["Visual_CoT-0"]
    got = [(d["id"], d["field"], d["reason"].split(":")[0]) for d in res["dropped"]]
    assert got == [("Zebra_CoT_count-10", "data[2].content",
                    "aux image 0 is not preceded by <abs_vis_token></abs_vis_token>"),
                   ("Zebra_CoT_count-11", "data[2].content", "expected a final \\boxed{answer}, found none"),
                   ("Zebra_CoT_count-12", "aux_images[0]", "file not found")]


# ---- malformed input: one line naming file, line, id and field; nothing written ----

MALFORMED = [  # (layout, how to break record 2 of the sample, field the message must name)
    ("monet", lambda r: r.pop("data"), "data"),
    ("monet", lambda r: r["data"][1]["content"][1].update(text=5), "data[1].content[1].text"),
    ("monet", lambda r: r["data"][2]["content"][1].update(type="video"), "data[2].content[1].type"),
    ("monet", lambda r: r["data"][2]["content"][1].pop("image_file_name"), "data[2].content[1].image_file_name"),
    ("lvr", lambda r: r["bboxes"][1].pop(), "bboxes[1]"),
    ("lvr", lambda r: r["conversations"][1].pop("value"), "conversations[1].value"),
    ("viscot", lambda r: r["image"].__setitem__(1, "viscot/gqa/2.png###[10, 20]"), "image[1]"),
]


@pytest.mark.parametrize("layout,breaker,fld", MALFORMED, ids=[m[2] for m in MALFORMED])
def test_malformed_record_one_line_error(tmp_path, capsys, layout, breaker, fld):
    recs = (monet_sample if layout == "monet" else bbox_sample)(tmp_path / layout)
    recs = [recs[0], recs[3]] if layout == "viscot" else recs[:2]
    breaker(recs[1])
    data = tmp_path / layout / "in.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "out" / "x.jsonl"
    with pytest.raises(SystemExit) as e:
        prepare.run_main(prepare.main, ["convert", "--from", "monet" if layout == "monet" else "bbox", "--data",
                                        str(data), "--images", str(tmp_path / layout), "--out", str(out)])
    rid = {"monet": "Zebra_CoT_count-7", "lvr": "gqa-9", "viscot": "gqa-7"}[layout]
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1, err
    assert err.startswith(f"error: {data} line 2 (id {rid}): {fld}: expected "), err
    assert not out.exists() and not list(out.parent.glob("*.tmp"))


def test_json_array_streamed_across_chunks(tmp_path, monkeypatch):
    """A tiny read size forces every record across several chunk boundaries: same values, right start lines."""
    recs = monet_sample(tmp_path / "monet") + [{"n": 12345678901234567890}, [1, 2], "s", 1.5e3, True, None]
    path = tmp_path / "a.json"
    path.write_text(json.dumps(recs, indent=1))
    monkeypatch.setattr(convert, "CHUNK", 7)
    got = list(convert.read_records(path))
    assert [o for _, _, o in got] == recs and [i for _, i, _ in got] == list(range(len(recs)))
    lines = path.read_text().splitlines()
    assert all(lines[ln - 1].strip().startswith(json.dumps(o, indent=1).splitlines()[0]) for ln, _, o in got)
    path.write_text('[{"a": 1},\n {"b": 2},\n {"a": 1 2}\n]')
    with pytest.raises(prepare.DataError, match=r"a\.json line 3: json: expected record 2 as JSON, found invalid "
                                                r"JSON \(Expecting ',' delimiter at line 3\)"):
        list(convert.read_records(path))
    path.write_bytes(b'[{"a": "\xff"}]')
    with pytest.raises(prepare.DataError, match=r"a\.json: text: expected UTF-8, found byte 0xff"):
        list(convert.read_records(path))
    path.write_bytes('\ufeff[{"a": 1},\n 2]'.encode())   # a byte-order mark is not an error
    assert list(convert.read_records(path)) == [(1, 0, {"a": 1}), (2, 1, 2)]
    path.write_text('[{"a": 1}')
    with pytest.raises(prepare.DataError, match=r"line 1: json: expected , or \], found the end of the file"):
        list(convert.read_records(path))
