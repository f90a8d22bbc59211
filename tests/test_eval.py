"""Tests for eval.py: answer extraction on tricky answers, the JSONL and VLMEvalKit TSV readers, an end-to-end run
of both tables on the tiny model, the norm profile's shapes, and the resumable difficulty scorer. CPU, seconds.
    .venv/bin/python -m pytest -q tests/test_eval.py
"""
import base64
import csv
import io
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest

import eval as gapeval
import sample
import test_sample as ts   # the tiny-model builders (module import: its tests are not collected twice)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return ts.tiny_folder(str(tmp_path_factory.mktemp("eval")), "pca")


@pytest.fixture(scope="module")
def bundle(folder):
    return sample.load(folder)


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    (d / "images").mkdir()
    recs = [{"id": "r0", "image": "images/0.png", "question": ts.Q_A, "answer": "3", "category": "count",
             "response": "<think>look <latent> three</think><answer>3</answer>"},
            {"id": "r1", "image": "images/1.png", "question": ts.Q_B, "answer": "no"},
            {"id": "r2", "image": "images/0.png", "question": "Which?", "answer": "B", "category": "mc"}]
    ts.image(56, 56, 1).save(d / "images/0.png")
    ts.image(84, 56, 2).save(d / "images/1.png")
    (d / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return d / "test.jsonl"


# ---- scoring -------------------------------------------------------------------------------------------------------

CASES = [  # (prediction, reference, choices, correct)
    ("<think>maybe A</think><answer>C</answer>", "C", None, True),
    ("<think>C looks right</think><answer>B</answer>", "C", None, False),
    ("The answer is (B).", "B", None, True),
    ("B.", "B", None, True),
    ("(D)", "D", None, True),
    ("Answer: c", "C", None, False),                       # lowercase is not committed to a letter
    ("A cat sits there, so the answer is D", "D", None, True),
    ("It is the square one", "B", {"A": "the circle", "B": "the square one"}, True),
    ("<answer>1,234.5</answer>", "1234.5", None, True),
    ("about 1,234", "1,234", None, True),
    ("The total is 99.5", "100", None, True),              # |99.5 - 100| / 100 = 0.5% <= 1%
    ("The total is 98", "100", None, False),
    ("x is \u22123", "-3", None, True),                    # unicode minus sign
    ("The answer is -3. Not 3.", "-3", None, True),
    ("-0.25", "-1/4", None, True),
    ("3", "-3", None, False),
    ("Yes, it is blue.", "yes", None, True),
    ("<answer>NO</answer>", "No", None, True),
    ("Nope, yes it is", "no", None, False),
    ("<answer> The Eiffel Tower. </answer>", "eiffel tower", None, True),
    ("a red square", "blue square", None, False),
]


@pytest.mark.parametrize("pred,ref,choices,ok", CASES)
def test_score_tricky_answers(pred, ref, choices, ok):
    assert gapeval.score(pred, ref, choices)[0] is ok


def test_parse_number():
    assert gapeval.parse_number("1,234,567.5") == 1234567.5
    assert gapeval.parse_number("12%") == 12.0 and gapeval.parse_number("3/4") == 0.75
    assert gapeval.parse_number("12 apples") is None and gapeval.parse_number("B") is None


# ---- readers -------------------------------------------------------------------------------------------------------


def _png_b64(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_tsv_reader(tmp_path):
    big = _png_b64(ts.image(56, 56, 3))
    rows = [{"index": "10", "image": big, "question": "What color?", "A": "red", "B": "blue", "C": "nan",
             "answer": "B", "category": "color", "hint": ""},
            {"index": "11", "image": "10", "question": "How many?", "A": "1", "B": "2", "C": "3",
             "answer": "C", "category": "count", "hint": "Count the squares."}]   # image "10": refers to row 10
    path = tmp_path / "bench.tsv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t")
        w.writeheader()
        w.writerows(rows)
    recs = gapeval.read_data(path)
    assert [r["id"] for r in recs] == ["10", "11"]
    # VLMEvalKit's prompt for Qwen2.5-VL; "nan" and "" are empty cells (pandas), and column C ("nan", "3") is a
    # float column, so the option prints as "3.0" exactly as VLMEvalKit prints it
    assert recs[0]["question"] == ("Question: What color?\nOptions:\nA. red\nB. blue\n"
                                   "Please select the correct answer from the options above. \n")
    assert recs[0]["choices"] == {"A": "red", "B": "blue"}
    assert recs[1]["question"].startswith("Hint: Count the squares.\nQuestion: How many?\nOptions:\nA. 1\n")
    assert "C. 3.0\n" in recs[1]["question"] and recs[1]["choices"]["C"] == "3.0"
    for r in recs:
        img = gapeval.record_image(r)
        assert img.size == (56, 56)
    assert gapeval.score("The answer is C", recs[1]["answer"], recs[1]["choices"])[0]
    rows[1]["image"] = "99"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t")
        w.writeheader()
        w.writerows(rows)
    with pytest.raises(ValueError, match=r"bench.tsv line 3 \(id 11\): image: expected base64 or the index of a "
                                         r"row with an image, found '99'"):
        gapeval.read_data(path)


def test_jsonl_reader_errors_name_line_and_field(jsonl, tmp_path):
    recs = gapeval.read_data(jsonl)
    assert [r["category"] for r in recs] == ["count", "all", "mc"] and Path(recs[0]["image"]).is_file()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "x", "image": str(jsonl.parent / "images/0.png"), "question": "q"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl line 1 \(id x\): answer: expected a non-empty string"):
        gapeval.read_data(bad)
    bad.write_text(json.dumps({"id": "y", "image": "nope.png", "question": "q", "answer": "1"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl line 1 \(id y\): image: expected an image file"):
        gapeval.read_data(bad)


# ---- runs ----------------------------------------------------------------------------------------------------------


def test_evaluate_tables(folder, bundle, jsonl, tmp_path, capsys):
    opts = gapeval.EvalOptions(model=str(folder), data=str(jsonl), modes="pca,zero,raw", latents="0,2",
                               out=str(tmp_path / "out"), max_new_tokens=8, batch_size=2)
    res = gapeval.evaluate(opts, bundle=bundle)
    out = capsys.readouterr().out
    assert "intervention table" in out and "budget sweep" in out
    saved = json.loads((tmp_path / "out/results.json").read_text())
    assert [r["mode"] for r in saved["intervention"]] == ["pca", "zero", "raw"]
    assert [r["latents"] for r in saved["sweep"]] == [0, 2] and saved["sweep_mode"] == "pca"
    for r in saved["intervention"] + saved["sweep"]:
        assert r["n"] == 3 and 0.0 <= r["accuracy"] <= 1.0 and r["latency_s"]["p90"] >= r["latency_s"]["p50"] > 0
        assert set(r["per_category"]) == {"all", "count", "mc"}
    assert saved["intervention"][1]["mean_latents"] == 0.0 and saved["intervention"][0]["mean_latents"] > 0
    assert saved["sweep"][0]["mean_latents"] == 0.0                      # N = 0 runs the zero mode
    files = sorted(p.name for p in (tmp_path / "out").glob("predictions-*.jsonl"))
    assert files == ["predictions-pca-2.jsonl", "predictions-pca-3.jsonl", "predictions-raw-3.jsonl",
                     "predictions-zero-0.jsonl"]
    pred = [json.loads(l) for l in (tmp_path / "out/predictions-pca-3.jsonl").read_text().splitlines()]
    assert [p["id"] for p in pred] == ["r0", "r1", "r2"] and {"prediction", "extracted", "correct"} <= set(pred[0])
    assert res["intervention"][0]["accuracy"] == saved["intervention"][0]["accuracy"]


def test_norm_profile_shapes(folder, bundle, jsonl, tmp_path):
    opts = gapeval.NormsOptions(model=str(folder), data=str(jsonl), limit=2, out=str(tmp_path / "norms"))
    gapeval.norms_main(opts, bundle=bundle)
    prof = json.loads((tmp_path / "norms/norms.json").read_text())
    L = bundle.model.cfg.text.num_hidden_layers
    assert prof["n_layers"] == L + 1 and len(prof["log_norm_layers"]) == L + 1 and prof["n_records"] == 2
    for row in prof["log_norm_layers"]:
        for k in ("text", "vision"):
            assert row[k]["n"] > 0 and row[k]["std"] >= 0
    assert set(prof["out_in_ratio"]) == {"text", "vision"} and prof["out_in_ratio"]["text"] > 0
    assert set(prof["feedback_norm"]) == {"raw", "pca", "vision"}
    # raw feedback is h̄ itself: RMS-normed, so its norm is close to sqrt(d) * |norm weight| (~8 for d = 64)
    assert 4 < prof["feedback_norm"]["raw"]["mean"] < 16
    assert (tmp_path / "norms/norms.png").stat().st_size > 1000


def test_score_file_resumes(folder, bundle, jsonl, tmp_path, monkeypatch):
    out = tmp_path / "scored.jsonl"
    kw = dict(samples=2, out_file=out, max_new_tokens=2, bundle=bundle)
    gapeval.score_file(folder, jsonl, **kw)
    first = [json.loads(l) for l in out.read_text().splitlines()]
    assert [r["id"] for r in first] == ["r0", "r1", "r2"]
    assert all(r["accuracy"] in (0.0, 0.5, 1.0) for r in first) and first[0]["response"].startswith("<think>")
    # a crash after the first record, mid-way through writing the second
    out.write_text(json.dumps(first[0]) + "\n" + json.dumps(first[1])[:20])
    calls = []
    real = sample.generate
    monkeypatch.setattr(sample, "generate", lambda *a, **k: calls.append(k["seed"]) or real(*a, **k))
    gapeval.score_file(folder, jsonl, **kw)
    assert calls == [1, 2]                                  # only r1 and r2 (seed + line) were sampled again
    assert [json.loads(l) for l in out.read_text().splitlines()] == first   # and drew the same samples


def test_summary_over_seeds(tmp_path, capsys):
    for name, accs in (("eval-gap-1", {"pca": 0.5, "zero": 0.25}), ("eval-gap-2", {"pca": 0.7, "zero": 0.25}),
                       ("eval-control-1", {"zero": 0.4})):
        (tmp_path / name).mkdir()
        rows = [{"mode": m, "accuracy": a} for m, a in accs.items()]
        (tmp_path / name / "results.json").write_text(json.dumps({"intervention": rows}))
    folders = [str(p) for p in sorted(tmp_path.iterdir())]
    rows = gapeval.main(["summary", *folders, "--json", str(tmp_path / "demo" / "summary.json")])
    got = {(r["run"], r["mode"]): (r["seeds"], r["mean"], r["std"]) for r in rows}
    assert got[("eval-gap", "pca")] == (2, pytest.approx(0.6), pytest.approx(0.1))
    assert got[("eval-gap", "zero")] == (2, pytest.approx(0.25), pytest.approx(0.0))
    assert got[("eval-control", "zero")] == (1, pytest.approx(0.4), pytest.approx(0.0))
    assert "eval-gap" in capsys.readouterr().out
    # summary.json: what `make demo` writes beside the printed table, read back
    table = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert set(table) == {"gap", "control"} and set(table["gap"]) == {"pca", "zero"}
    assert table["gap"]["pca"] == {"mean": pytest.approx(0.6), "std": pytest.approx(0.1), "seeds": {"1": 0.5, "2": 0.7}}
    assert table["control"]["zero"]["seeds"] == {"1": 0.4} and table["control"]["zero"]["std"] == 0.0


# ---- the oracle-latent probe ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    import prepare
    out = tmp_path_factory.mktemp("syn")
    prepare.main(["synthetic", "--out", str(out), "--n", "12", "--seed", "3", "--latents", "4", "--device", "cpu"])
    return out


def test_oracle_probe_feeds_true_targets(syn, monkeypatch):
    """The probe must put target v_j at latent pad j (row-major, across the records of a padded batch), and with
    feed=none run the same records with no span at all."""
    import torch
    import model
    import train
    m = model.load_pretrained(syn / "model")
    recs = train.Records(syn / "prepared", tau=1.0)
    with_spans = [i for i in range(len(recs)) if recs.start_id in recs.raw(i)[0]]
    ids_in, x_in, embed, decode = [], [], m.embed, m.decode
    monkeypatch.setattr(m, "embed", lambda ids, *a: ids_in.append(ids) or embed(ids, *a))
    monkeypatch.setattr(m, "decode", lambda x, pos, **k: x_in.append(x) or decode(x, pos, **k))
    res = gapeval.oracle_probe(m, syn / "prepared", "oracle", limit=3, batch_size=2)
    assert res["n"] == 3 and len(res["hits"]) == 3 and res["accuracy"] == sum(res["hits"]) / 3
    for ids, x, rows in zip(ids_in, x_in, (with_spans[:2], with_spans[2:3])):
        want = torch.cat([recs.get(i)["targets"] for i in rows])             # (n_pads, d) in row-major order
        assert torch.equal(x[ids == recs.pad_id], want)
    ids_in.clear()
    none = gapeval.oracle_probe(m, syn / "prepared", "none", limit=3, batch_size=3)
    assert none["n"] == 3 and not torch.isin(ids_in[0], torch.tensor([recs.start_id, recs.pad_id])).any()
    with pytest.raises(ValueError, match="feed 'own'"):
        gapeval.oracle_probe(m, syn / "prepared", "own")


def test_oracle_results_feed_the_summary(syn, tmp_path):
    """`eval.py oracle --out` writes results.json in the eval layout, so the demo's summary carries the probe."""
    rows = gapeval.main(["oracle", "--model", str(syn / "model"), "--data", str(syn / "prepared"), "--limit", "2",
                         "--out", str(tmp_path / "oracle-1"), "--device", "cpu"])
    res = json.loads((tmp_path / "oracle-1" / "results.json").read_text())
    assert [(r["mode"], r["n"], r["accuracy"]) for r in res["intervention"]] == [
        ("true_latents", 2, rows[0]["accuracy"]), ("no_latents", 2, rows[1]["accuracy"])]
    gapeval.main(["summary", str(tmp_path / "oracle-1"), "--json", str(tmp_path / "summary.json")])
    table = json.loads((tmp_path / "summary.json").read_text())
    assert table["oracle"]["true_latents"]["seeds"] == {"1": rows[0]["accuracy"]}


@pytest.mark.parametrize("sub", [[], ["norms"], ["oracle"], ["summary"]])
def test_every_subcommand_answers_help(sub, capsys):
    with pytest.raises(SystemExit) as e:
        gapeval.main(sub + ["--help"])
    assert e.value.code == 0 and "usage" in capsys.readouterr().out
