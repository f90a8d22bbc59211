"""vlmevalkit.py against VLMEvalKit itself (its source from PyPI ms-vlmeval, see vlmeval_oracle.py): exact-matching
scores on realistic model outputs, the prompts it builds for Qwen2.5-VL, and the TSV reading (pandas NA and type
rules, image references, convert("RGB")); plus eval.py's TSV handling of rows without answers, multi-image rows,
unclosed quotes and broken images.

    .venv/bin/python -m pytest -q tests/test_vlmeval.py
"""
import base64
import csv
import io
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import eval as gapeval  # noqa: E402
import sample  # noqa: E402
import test_sample as ts  # noqa: E402  (the tiny-model builders)
import vlmeval_oracle as V  # noqa: E402
import vlmevalkit  # noqa: E402

NAN = float("nan")


@pytest.fixture(scope="module")
def ns():
    return V.oracle()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return sample.load(ts.tiny_folder(str(tmp_path_factory.mktemp("vlmeval")), "pca"))


# ---- scoring: >= 60 realistic outputs, 100 % agreement ----

OPTS4 = {"A": "3", "B": "5", "C": "7", "D": "12"}
OPTS_TXT = {"A": "a red circle", "B": "a blue square", "C": "a green triangle", "D": "none of the above"}
COT = ("Let me look at the image carefully. There are several shapes: a red circle at the top left, a blue square "
       "in the middle and a green triangle. Counting the red ones gives 3. Comparing with the options, A says 3, "
       "B says 5. Therefore the correct option is A.")
MCQ = [  # (prediction, answer, options)
    ("C", "C", OPTS4), ("(C)", "C", OPTS4), ("C.", "C", OPTS4), ("C. 7", "C", OPTS4), ("Answer: C", "C", OPTS4),
    ("The answer is C.", "C", OPTS4), ("The answer is C, not A.", "C", OPTS4), ("<answer>C</answer>", "C", OPTS4),
    ("<think>count them</think><answer>C</answer>", "C", OPTS4), ("答案：C", "C", OPTS4), ("答案是 C", "C", OPTS4),
    ("选C", "C", OPTS4), (COT, "A", OPTS4), (COT + "\nAnswer: A", "A", OPTS4),
    ("Answer: B\nAnswer: C", "C", OPTS4), ("I think it is B or C.", "C", OPTS4), ("7", "C", OPTS4),
    ("The answer is 7.", "C", OPTS4), ("12", "D", OPTS4), ("D) 12", "D", OPTS4), ("**D**", "D", OPTS4),
    ("Option D is correct because 12 > 7.", "D", OPTS4), ("a blue square", "B", OPTS_TXT),
    ("It is a blue square.", "B", OPTS_TXT), ("A blue square.", "B", OPTS_TXT), ("B: a blue square", "B", OPTS_TXT),
    ("None of the above", "D", OPTS_TXT), ("Cannot determine the answer from the image.", "A", OPTS4),
    ("Z", "A", OPTS4), ("", "A", OPTS4), ("A", "A", {"A": "yes", "B": "no"}),
    ("The image shows a cat. A cat is a mammal. So B.", "B", {"A": "dog", "B": "cat"}),
    ("c", "C", OPTS4), ("[C]", "C", OPTS4), ("C is correct; A and B are wrong.", "C", OPTS4),
]
YN = [  # (prediction, answer)
    ("Yes", "Yes"), ("yes.", "Yes"), ("Yes, the cat is on the mat.", "Yes"), ("No", "No"), ("No, it is not.", "No"),
    ("<answer>no</answer>", "No"), ("Yes and no.", "Yes"), ("I cannot tell.", "No"), ("Nope.", "No"),
    ("YES", "Yes"), ("No. There is no dog, yes really.", "No"), ("The answer is yes", "Yes"),
    ("是的", "Yes"), ("yes-no", "No"), ("no, no, no!", "No"),
]
VQA = [  # (prediction, answer, dataset)
    ("12", "12", "ChartQA_TEST"), ("12.5", "12", "ChartQA_TEST"), ("12.6", "12", "ChartQA_TEST"),
    ("11.4", "12", "ChartQA_TEST"), ("12%", "0.12", "ChartQA_TEST"), ("12%", "12", "ChartQA_TEST"),
    ("0.12", "12%", "ChartQA_TEST"), ("The answer is 12", "12", "ChartQA_TEST"), (" 1.05 ", "1", "ChartQA_TEST"),
    ("1,200", "1200", "ChartQA_TEST"), ("Yes", "yes", "ChartQA_TEST"), ("0", "0", "ChartQA_TEST"),
    ("-3.9", "-4", "ChartQA_TEST"), ("2019", "2018", "ChartQA_TEST"), ("nan", "nan", "ChartQA_TEST"),
    ("Paris", "paris", "OCRVQA_TEST"), ("Paris.", "paris", "OCRVQA_TEST"), ("harry potter", "Harry Potter", "GQA_TestDev"),
    ("The Title", "the title", "DocVQA_VAL"), ("The Tittle", "the title", "DocVQA_VAL"),
    ("something else", "the title", "DocVQA_VAL"), ("42", "['42', 'forty-two']", "InfoVQA_VAL"),
]


def _mcq_row(answer, options):
    return pd.Series({"index": 1, "question": "Which one?", "hint": NAN, "answer": answer,
                      **{c: options.get(c, NAN) for c in "ABCD"}})


def test_scores_agree_with_vlmevalkit(ns):
    n = 0
    for pred, answer, options in MCQ:
        want_hit, want_opt = V.mcq_hit(ns, _mcq_row(answer, options), pred)
        rec = {"kind": "MCQ", "answer": answer, "choices": dict(options)}
        got, opt = vlmevalkit.score(pred, rec, "MMStar")
        assert (got, opt) == (float(want_hit), want_opt), (pred, options)
        n += 1
    for pred, answer in YN:
        want_hit, want_ext = V.yorn_hit(ns, answer, pred)
        got, ext = vlmevalkit.score(pred, {"kind": "Y/N", "answer": answer, "choices": None}, "HallusionBench")
        assert (got, ext) == (float(want_hit), want_ext), pred
        n += 1
    for pred, answer, dataset in VQA:
        want = V.vqa_hit(ns, answer, pred, dataset)
        got, _ = vlmevalkit.score(pred, {"kind": "VQA", "answer": answer, "choices": None}, dataset)
        assert got == pytest.approx(want, abs=1e-12), (pred, answer, dataset)
        n += 1
    assert n >= 60
    # where gap's lenient scorer says right and VLMEvalKit's exact matching says wrong
    for pred in ("The answer is C, not A.", "<answer>C</answer>", "答案：C"):
        assert gapeval.score(pred, "C", OPTS4)[0] is True
        assert vlmevalkit.score(pred, {"kind": "MCQ", "answer": "C", "choices": OPTS4}, "MMStar") == (0.0, "Z")


def test_process_punctuation_agrees(ns):
    for s in ("a.b. c, d", "1,000 apples; no", "e.g. (yes)", "x" + ". y" * 40, "3.14 is pi.", "well-known? yes!"):
        assert vlmevalkit.process_punctuation(s) == ns["process_punctuation"](s), s


# ---- the TSV: reading and prompts like VLMEvalKit ----

def _b64(img, fmt="PNG"):
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def _picture(mode, seed=0, size=(40, 30)):
    rng = np.random.default_rng(seed)
    if mode == "P":
        img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).quantize(16)
        img.info["transparency"] = 0
        return img
    chans = {"RGB": 3, "RGBA": 4, "LA": 2, "L": 1}[mode]
    arr = rng.integers(0, 256, (size[1], size[0], chans), dtype=np.uint8)
    return Image.fromarray(arr[..., 0] if chans == 1 else arr, mode)


def _write_tsv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)
    return path


def test_tsv_matches_pandas_and_prompts(ns, tmp_path):
    """Cells VLMEvalKit (pandas) reads as empty ("", "NA", "N/A", "None", "nan"), numeric option columns printed as
    floats, hints, multi-line quoted questions, image references, RGBA/P/LA images: same prompts, options,
    answers and pixels as VLMEvalKit's own code on pandas' reading of the file."""
    imgs = {m: _b64(_picture(m, i)) for i, m in enumerate(("RGB", "RGBA", "P", "LA", "L"))}
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"]
    rows = [
        [0, "How many circles?", "", "3", "5", "NA", "", "A", "count", imgs["RGB"]],
        [1, "Which is red?\nLook closely.", "The red one is large.", "cat", "N/A", "None", "dog", "D", "color",
         imgs["RGBA"]],
        [2, 'He said "hi" twice', "nan", "2.5", "3", "n/a", "x", "B", "quote", imgs["P"]],
        [3, "Pick one", "NULL", "True", "7", "#N/A", "8", "C", "misc", "0"],
        [4, "Last", "a hint", "1e3", "-", "0", "null", "A", "misc", imgs["LA"]],
        [5, "Grey?", "", "yes", "no", "", "", "A", "grey", imgs["L"]],
    ]
    path = _write_tsv(tmp_path / "MMStar.tsv", header, rows)
    recs, kind, dataset = vlmevalkit.read_records(path)
    assert (kind, dataset) == ("MCQ", "MMStar")
    data = pd.read_csv(path, sep="\t")                  # what VLMEvalKit's load() does
    data["index"] = [str(x) for x in data["index"]]
    image_map = dict(zip(data["index"], [str(x) for x in data["image"]]))
    for rec, (_, line) in zip(recs, data.iterrows()):
        assert rec["id"] == line["index"]
        assert rec["question"] == V.prompt_text(ns, line, "MCQ"), rec["id"]
        assert rec["choices"] == {k: str(v) for k, v in ns["build_choices"](line).items()}
        assert rec["answer"] == line["answer"]
        b64 = image_map[line["index"]]
        b64 = image_map[b64] if len(b64) <= 64 else b64
        want, got = ns["decode_base64_to_image"](b64), gapeval.record_image(rec)
        assert got.mode == want.mode and np.array_equal(np.asarray(got), np.asarray(want)), rec["id"]
    assert recs[0]["question"].endswith("Options:\nA. 3\nB. 5\nPlease select the correct answer from the "
                                        "options above. \n")   # "NA" and "" are empty cells
    assert "N/A" not in recs[1]["question"] and recs[1]["choices"] == {"A": "cat", "D": "dog"}


def test_yes_no_and_vqa_prompts(ns, tmp_path):
    header = ["index", "question", "answer", "category", "image"]
    img = _b64(_picture("RGB"))
    path = _write_tsv(tmp_path / "HallusionBench.tsv", header,
                      [[0, "Is the sky blue?", "Yes", "a", img], [1, "Is it 2019?", "No", "b", "0"]])
    recs, kind, _ = vlmevalkit.read_records(path)
    data = pd.read_csv(path, sep="\t")
    assert kind == "Y/N"
    assert [r["question"] for r in recs] == [V.prompt_text(ns, line, "Y/N") for _, line in data.iterrows()]
    path = _write_tsv(tmp_path / "ChartQA_TEST.tsv", header, [[0, "What is the peak?", "12.5", "a", img],
                                                               [1, "How many bars?", "4", "b", "0"]])
    recs, kind, _ = vlmevalkit.read_records(path)
    assert kind == "VQA" and [r["answer"] for r in recs] == ["12.5", "4.0"]    # float column, as pandas reads it


# ---- eval.py on TSV files: answers optional, refusals with the row, checks before generation ----

def test_eval_tsv_without_answers_and_vlmeval_scores(bundle, tmp_path, capsys):
    img = _b64(_picture("RGB", size=(56, 56)))
    header = ["index", "question", "A", "B", "answer", "image"]
    path = _write_tsv(tmp_path / "MMStar.tsv", header, [[0, "Which?", "cat", "dog", "A", img],
                                                        [1, "Which one?", "red", "blue", "", "0"]])
    opts = gapeval.EvalOptions(model=bundle.path, data=str(path), modes="zero", out=str(tmp_path / "out"),
                               max_new_tokens=4)
    res = gapeval.evaluate(opts, bundle=bundle)
    row = res["intervention"][0]
    assert row["n"] == 2 and row["n_scored"] == 1
    preds = [json.loads(x) for x in Path(row["predictions"]).read_text().splitlines()]
    assert preds[1]["answer"] is None and preds[1]["correct"] is None and preds[1]["prediction"] is not None
    assert preds[0]["correct"] == vlmevalkit.score(preds[0]["prediction"].replace("<latent>", ""),
                                                   {"kind": "MCQ", "answer": "A", "choices": {"A": "cat", "B": "dog"}},
                                                   "MMStar")[0]
    assert "scoring: vlmeval; 1/2 records have an answer" in capsys.readouterr().err


def test_tsv_errors_name_the_row(tmp_path, monkeypatch):
    img = _b64(_picture("RGB"))
    header = ["index", "question", "answer", "image"]
    # a multi-image row
    path = _write_tsv(tmp_path / "a.tsv", header, [[0, "q", "x", img], [7, "q", "x", str([img, img])]])
    with pytest.raises(ValueError, match=r"a\.tsv line 3 \(id 7\): image: expected one image, found a list"):
        gapeval.read_data(path)
    # a broken base64 image is found while reading, before any generation starts
    path = _write_tsv(tmp_path / "b.tsv", header, [[0, "q", "x", img], [1, "q", "x", "A" * 100]])
    with pytest.raises(ValueError, match=r"b\.tsv line 3 \(id 1\): image: expected a base64 image"):
        gapeval.read_data(path)
    # a quote that never closes would swallow the rows after it (pandas does exactly that)
    lines = ["index\tquestion\tanswer\timage", f"0\tq\tx\t{img}", f'1\t"an open quote\tx\t{img}', f"2\tq\tx\t{img}",
             f'3\tq "inner" ok\tx\t{img}', f"4\tq\tx\t{img}"]
    path = tmp_path / "c.tsv"
    path.write_text("\n".join(lines) + "\n")
    assert len(pd.read_csv(path, sep="\t")) < 5                # the silent failure being guarded against
    with pytest.raises(ValueError, match=r"c\.tsv line 3: quote: .*unclosed"):
        gapeval.read_data(path)
    path.write_text("\n".join(lines[:2] + [f'1\t"an open quote\tx\t{img}']) + "\n")
    with pytest.raises(ValueError, match=r"c\.tsv line 3: quote: .*unclosed"):
        gapeval.read_data(path)


def test_scoring_choice(tmp_path):
    """auto: vlmeval for a TSV, gap for JSONL; what vlmeval does not reproduce is refused (explicit) or falls back to
    gap with a note (auto); a split without answers needs no scorer."""
    img = _b64(_picture("RGB"))
    path = _write_tsv(tmp_path / "TextVQA_VAL.tsv", ["index", "question", "answer", "image"],
                      [[0, "What does it say?", "stop", img]])
    recs = gapeval.read_data(path)
    opts = lambda scoring, data=path: gapeval.EvalOptions(model="m", data=str(data), scoring=scoring)
    with pytest.raises(gapeval.prepare.DataError, match=r"TextVQA_VAL\.tsv: scoring: .*VQA score"):
        gapeval.resolve_scoring(opts("vlmeval"), recs)
    scoring, note = gapeval.resolve_scoring(opts("auto"), recs)
    assert scoring == "gap" and "falls back to gap" in note
    assert gapeval.resolve_scoring(opts("vlmeval"), [{**recs[0], "answer": None}]) == ("vlmeval", None)
    assert gapeval.resolve_scoring(opts("auto", tmp_path / "x.jsonl"), recs) == ("gap", None)
    mmb = _write_tsv(tmp_path / "MMBench_DEV_EN.tsv", ["index", "question", "A", "B", "answer", "image"],
                     [[0, "Which?", "x", "y", "A", img]])
    with pytest.raises(gapeval.prepare.DataError, match="circular"):
        gapeval.resolve_scoring(opts("vlmeval", mmb), gapeval.read_data(mmb))


@pytest.mark.parametrize("cells", [["3", " 3"], ["+3", "4 "], ["1.", "2"], [".5", "1"], ["1e3", "2"], ["inf", "1"],
                                   ["007", "-0"], ["1_000", "2"], ["True", "false"], ["True", ""], ["3", "-"],
                                   ["0x10", "1"], ["1,5", "2"], ["3", ""], ["99999999999999999999", "1"]])
def test_cell_types_like_pandas(ns, tmp_path, cells):
    """An option column is printed as pandas types it (int, float, bool or text, NaN for NA)."""
    img = _b64(_picture("RGB"))
    rows = [[i, "Which?", c, "x", "B", img if i == 0 else "0"] for i, c in enumerate(cells)]
    path = _write_tsv(tmp_path / "MMStar.tsv", ["index", "question", "A", "B", "answer", "image"], rows)
    recs, _, _ = vlmevalkit.read_records(path)
    data = pd.read_csv(path, sep="\t")
    assert [r["question"] for r in recs] == [V.prompt_text(ns, line, "MCQ") for _, line in data.iterrows()]
