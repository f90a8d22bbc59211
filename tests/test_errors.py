"""Bad input: every expected failure ends in one line on stderr, `error: <where>: <field>: <expected, found>`, and a
non-zero exit code, with no traceback (--debug shows it); nothing is lost or overwritten silently. One test per class
of failure, each run through the script's own `__main__` block.

    .venv/bin/python -m pytest -q tests/test_errors.py
"""
import json
import os
import pickle
import runpy
import shutil
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import eval as gapeval  # noqa: E402
import prepare  # noqa: E402
import train  # noqa: E402


def run_script(script, argv, monkeypatch, capsys):
    """`python SCRIPT ARGV` for a run that fails: its __main__ block, in this process (no 3 s interpreter start).
    -> (exit code, the one error line). Asserts there is exactly one `error:` line and no traceback."""
    monkeypatch.setattr(sys, "argv", [script, *argv])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert "Traceback" not in err and len(lines) == 1 and err.rstrip().endswith(lines[0]), err
    return e.value.code, lines[0]


# ---- options: checked when parsed ----

BAD_OPTIONS = [  # (script, argv, the message)
    ("train.py", ["--lr", "-1"], "train.py: --lr: expected a number >= 0, found -1.0"),
    ("train.py", ["--global-batch", "0"], "--global-batch: expected an integer >= 1, found 0"),
    ("train.py", ["--epochs", "-1"], "--epochs: expected an integer >= 1, found -1"),
    ("train.py", ["--micro-batch", "two"], "--micro-batch: expected an integer, found 'two'"),
    ("sample.py", ["--model", "m", "--image", "i", "--question", "q", "--top-p", "0"],
     "sample.py: --top-p: expected a number > 0 and <= 1, found 0.0"),
    ("sample.py", ["--model", "m", "--image", "i", "--question", "q", "--temperature", "nan"],
     "--temperature: expected a finite number, found nan"),
    ("eval.py", ["--model", "m", "--data", "d", "--batch-size", "0"], "--batch-size: expected an integer >= 1"),
    ("eval.py", ["norms", "--model", "m", "--data", "d", "--limit", "-2"], "eval.py norms: --limit: expected"),
    ("prepare.py", ["score", "--data", "d", "--model", "m", "--samples", "0"],
     "prepare.py score: --samples: expected an integer >= 1, found 0"),
    ("prepare.py", ["build", "--data", "d", "--model", "m", "--out", "o", "--pca-variance", "1.5"],
     "--pca-variance: expected a number > 0 and <= 1, found 1.5"),
    ("bench.py", ["--decode-steps", "1"], "bench.py: --decode-steps: expected an integer >= 2, found 1"),
]


@pytest.mark.parametrize("script,argv,msg", BAD_OPTIONS, ids=[f"{s} {a[-2]}" for s, a, _ in BAD_OPTIONS])
def test_bad_option_value(script, argv, msg, monkeypatch, capsys):
    code, line = run_script(script, argv, monkeypatch, capsys)
    assert code == 2 and msg in line, line


def test_options_built_in_code_are_checked(syn, tmp_path):
    # train.main(TrainConfig(...)) skips argparse: the same bounds apply (a global batch of 0 divided by zero)
    cfg = train.TrainConfig(data=str(syn / "prepared"), model=str(syn / "model"), out=str(tmp_path), global_batch=0)
    with pytest.raises(prepare.DataError, match="--global-batch: expected an integer >= 1, found 0"):
        train.main(cfg)


# ---- unreadable files are named ----


def test_unreadable_checkpoint_files(syn, tmp_path, monkeypatch, capsys):
    img = str(next((syn / "raw" / "images").iterdir()))
    folder = tmp_path / "m"
    shutil.copytree(syn / "model", folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])   # a copy cut short
    argv = ["--model", str(folder), "--image", img, "--question", "how many?", "--device", "cpu"]
    code, line = run_script("sample.py", argv, monkeypatch, capsys)
    assert code == 1 and line.startswith(f"error: {weights}: file: expected a safetensors file"), line
    (folder / "config.json").write_text('{"hidden_size": ')
    code, line = run_script("sample.py", argv, monkeypatch, capsys)
    assert code == 1 and line.startswith(f"error: {folder / 'config.json'}: cannot read config"), line
    with pytest.raises(prepare.DataError):   # --debug: the same failure raises, so Python prints the traceback
        run_script("sample.py", argv + ["--debug"], monkeypatch, capsys)
    shutil.rmtree(folder)
    shutil.copytree(syn / "model", folder)
    (folder / "gap.json").write_text('{"latent_head": "pca", ')
    code, line = run_script("sample.py", argv, monkeypatch, capsys)
    assert code == 1 and line.startswith(f"error: {folder / 'gap.json'}: file: expected a JSON file, found "
                                         f"JSONDecodeError"), line


def test_ctrl_c_is_one_line_and_exit_130(capsys):
    def interrupted(argv):
        raise KeyboardInterrupt
    with pytest.raises(SystemExit) as e:
        prepare.run_main(interrupted, [])
    assert e.value.code == 130 and capsys.readouterr().err == "interrupted\n"
    with pytest.raises(KeyboardInterrupt):   # --debug keeps the traceback
        prepare.run_main(interrupted, ["--debug"])


def test_a_bug_keeps_its_traceback():
    def buggy(argv):
        return {}["missing"]
    with pytest.raises(KeyError):
        prepare.run_main(buggy, [])


# ---- text files: UTF-8, lines end at "\n" only ----


def _good_lines(syn, n):
    """n valid build records from the synthetic raw data, with absolute paths (the copy lives elsewhere)."""
    recs = [json.loads(x) for x in (syn / "raw" / "train.jsonl").read_text().splitlines()[:n]]
    for r in recs:
        r["image"] = str(syn / "raw" / r["image"])
        r["aux_images"] = [str(syn / "raw" / a) for a in r["aux_images"]]
    return recs


def test_non_utf8_input_names_file_and_line(syn, tmp_path, monkeypatch, capsys):
    data = tmp_path / "latin1.jsonl"
    good, bad = _good_lines(syn, 2)
    bad["question"] = "Combien de carrés ?"
    data.write_bytes(json.dumps(good).encode() + b"\n" + json.dumps(bad, ensure_ascii=False).encode("latin-1") + b"\n")
    col = json.dumps(bad, ensure_ascii=False).index("é") + 1
    want = f"error: {data} line 2: text: expected UTF-8, found byte 0xe9 at column {col}"
    code, line = run_script("prepare.py", ["build", "--data", str(data), "--model", str(syn / "model"),
                                           "--out", str(tmp_path / "out")], monkeypatch, capsys)
    assert code == 1 and line == want
    code, line = run_script("eval.py", ["--model", str(syn / "model"), "--data", str(data)], monkeypatch, capsys)
    assert code == 1 and line == want


def test_u2028_inside_a_json_string_is_one_line(syn, tmp_path):
    # a raw U+2028 (LINE SEPARATOR) is valid inside a JSON string; str.splitlines() would cut the record in two
    recs = _good_lines(syn, 3)
    recs[0]["question"] = "How many\u2028red shapes?"
    recs[2]["answer"] = 7   # line 3 is bad: its number must not shift
    data = tmp_path / "u2028.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    assert "\u2028" in data.read_text(encoding="utf-8")
    opts = prepare.BuildOptions(data=str(data), model=str(syn / "model"), out=str(tmp_path / "out"))
    with pytest.raises(prepare.DataError, match=rf"^1 bad record\(s\); the first: {data} line 3 \(id {recs[2]['id']}\)"
                                                rf": answer: expected a string"):
        prepare.build(opts)
    recs[2]["answer"] = "7"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    assert [r["question"] for r in gapeval.read_data(data)] == [r["question"] for r in recs]


# ---- ids key results: a repeated one is an error ----


def test_duplicate_ids(syn, tmp_path):
    recs = _good_lines(syn, 2)
    recs[1]["id"] = recs[0]["id"]
    data = tmp_path / "dup.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    with pytest.raises(prepare.DataError, match=rf"dup.jsonl line 2 \(id {recs[0]['id']}\): id: expected a unique "
                                                rf"id, found the id of line 1 again"):
        gapeval.read_data(data)
    tsv = tmp_path / "dup.tsv"
    tsv.write_text("index\timage\tquestion\tanswer\n" + "".join(f"7\t{'A' * 100}\tq{i}\ta\n" for i in range(2)))
    with pytest.raises(prepare.DataError, match=r"dup.tsv: index: expected unique values, found '7' twice"):
        gapeval.read_data(tsv)
    prepared = tmp_path / "prepared"   # the prepared records key the latent targets
    shutil.copytree(syn / "prepared", prepared)
    first = (prepared / "records.jsonl").read_text().splitlines()[0]
    with open(prepared / "records.jsonl", "a") as f:
        f.write(first + "\n")
    n = len((prepared / "records.jsonl").read_text().splitlines())
    with pytest.raises(prepare.DataError, match=rf"records.jsonl line {n} \(id {json.loads(first)['id']}\): id: "
                                                rf"expected a unique id, found the id of line 1 again"):
        train.Records(prepared, tau=0.0)


# ---- outputs never overwrite inputs ----


def test_output_equal_to_an_input_is_refused(syn, tmp_path, monkeypatch, capsys):
    data = tmp_path / "few.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _good_lines(syn, 2)))
    before = data.read_bytes()
    score = ["score", "--data", str(data), "--model", str(syn / "model"), "--device", "cpu"]
    code, line = run_script("prepare.py", score + ["--out", str(data)], monkeypatch, capsys)
    assert code == 1 and line == f"error: {data}: --out: expected a file other than --data (it is rewritten while " \
                                 f"scoring), found --data itself" and data.read_bytes() == before
    other = tmp_path / "other.scored.jsonl"   # a resumed --out holding records --data lacks would lose them
    other.write_text(json.dumps({"id": "someone-else", "accuracy": 1.0}) + "\n")
    code, line = run_script("prepare.py", score + ["--out", str(other)], monkeypatch, capsys)
    assert code == 1 and line.startswith(f"error: {other} line 1: id: expected the ids of {data}")
    code, line = run_script("train.py", ["--data", str(syn / "prepared"), "--model", str(syn / "model"),
                                         "--out", str(syn / "model"), "--device", "cpu"], monkeypatch, capsys)
    assert code == 1 and line.startswith(f"error: {syn / 'model'}: --out: expected a folder other than --model")
    code, line = run_script("prepare.py", ["build", "--data", str(data), "--model", str(syn / "model"),
                                           "--out", str(syn / "model")], monkeypatch, capsys)
    assert code == 1 and f"{syn / 'model'}: --out: expected a folder other than --model" in line


# ---- training inputs that must agree ----


def _train_argv(syn, out, *extra):
    return ["--data", str(syn / "prepared"), "--model", str(syn / "model"), "--out", str(out), "--global-batch", "4",
            "--micro-batch", "2", "--lr", "2e-3", "--epochs", "1", "--device", "cpu", *extra]


def test_resume_refuses_a_changed_config(syn, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    train.main(train.parse_args(_train_argv(syn, out, "--stop-after", "1")))
    state = train.latest_checkpoint(out)[1] / "meta.json"
    # --save-every and --log-every do not change the result; the lr and the seed do
    argv = _train_argv(syn, out, "--resume", "--lr", "1e-3", "--seed", "1", "--save-every", "2", "--log-every", "2")
    code, line = run_script("train.py", argv, monkeypatch, capsys)
    assert code == 1 and line == (f"error: {state}: config: expected the options the checkpoint was trained with, "
                                  f"found --lr 0.002 -> 0.001, --seed 12345 -> 1 (pass --allow-config-change to "
                                  f"resume anyway)")
    train.main(train.parse_args(argv + ["--allow-config-change"]))
    assert "resuming with changed options: --lr 0.002 -> 0.001" in capsys.readouterr().out
    assert (out / "gap.json").is_file()


def test_unreadable_state_file(syn, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    train.main(train.parse_args(_train_argv(syn, out, "--stop-after", "1")))
    folder = train.latest_checkpoint(out)[1]
    argv = _train_argv(syn, out, "--resume")
    for name, want in ((next(folder.glob("*.distcp")).name, f"{folder}: checkpoint: expected readable shards"),
                       (".metadata", f"{folder}: checkpoint: expected readable shards and .metadata, found "
                                     f"UnpicklingError"),
                       ("rng-0.pt", f"{folder / 'rng-0.pt'}: file: expected a torch state file, found an unreadable"),
                       ("meta.json", f"{folder / 'meta.json'}: file: expected a checkpoint's meta.json, found an "
                                     f"unreadable one")):
        whole = (folder / name).read_bytes()
        (folder / name).write_bytes(whole[:len(whole) // 2])   # a copy cut short
        code, line = run_script("train.py", argv, monkeypatch, capsys)
        assert code == 1 and line.startswith(f"error: {want}"), (name, line)
        (folder / name).write_bytes(whole)


class _RunsCode:
    """A pickle that would call os.system when unpickled: what a tampered checkpoint .metadata could hold."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_tampered_checkpoint_metadata_runs_nothing(syn, tmp_path, monkeypatch, capsys):
    """torch.distributed.checkpoint unpickles .metadata with plain pickle; --resume reads it through an unpickler
    that admits only DCP's metadata classes, so a tampered file is one error line and its code never runs."""
    out, marker = tmp_path / "run", tmp_path / "pwned"
    train.main(train.parse_args(_train_argv(syn, out, "--stop-after", "1")))
    folder = train.latest_checkpoint(out)[1]
    with open(folder / ".metadata", "rb") as f:
        train.DCPMetadataUnpickler(f).load()    # a genuine one passes
    (folder / ".metadata").write_bytes(pickle.dumps(_RunsCode(marker)))
    code, line = run_script("train.py", _train_argv(syn, out, "--resume"), monkeypatch, capsys)
    assert code == 1 and "UnpicklingError: posix.system is not part of a checkpoint's metadata" in line, line
    assert not marker.exists()


def test_data_prepared_with_another_tokenizer(syn, tmp_path, monkeypatch, capsys):
    other = tmp_path / "other-model"
    shutil.copytree(syn / "model", other)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]   # two tokens swap ids: every record's ids would mean other text
    (other / "tokenizer.json").write_text(json.dumps(tok))
    argv = _train_argv(syn, tmp_path / "run")
    argv[argv.index("--model") + 1] = str(other)
    code, line = run_script("train.py", argv, monkeypatch, capsys)
    assert code == 1 and line == (f"error: {other / 'tokenizer.json'}: tokenizer: expected the tokenizer "
                                  f"{syn / 'prepared' / 'tokenizer.json'} was prepared with, found 4 differing "
                                  f"vocabulary entries (e.g. {min(a, b)!r}); run prepare.py build with this --model")


# ---- prepare.py build: tag structure and length of each example ----

BAD_TAGS = [  # (response, the message)
    ("<think>a <think>b</think></think><answer>1</answer>",
     "expected <think> outside other tags, found <think> at character 9 inside <think>"),
    ("<think>a <answer>1</answer>", "expected <answer> outside other tags, found <answer> at character 9 inside"),
    ("<think>a <parser>b</think></parser><answer>1</answer>", "expected </parser>, found </think> at character 18"),
    ("<parser>b</parser><answer>1</answer>", "expected <parser> inside <think>, found <parser> at character 0"),
    ("<think>a</think><answer>1</answer><answer>2</answer>", "expected one <answer>, found a second <answer> at"),
    ("<think>a</think><answer>1", "expected </answer>, found the end of the response"),
    ("a</think><answer>1</answer>", "expected <think> before it, found </think> at character 1"),
]


def test_build_checks_tags_and_lengths(syn, tmp_path, monkeypatch, capsys):
    recs = _good_lines(syn, len(BAD_TAGS) + 2)
    for r, (response, _) in zip(recs[1:], BAD_TAGS):
        r.update(response=response, aux_images=[])
    long = recs[-1]
    long["question"] = "How many red shapes? " * 200   # ~1000 tokens with the image and the response
    data = tmp_path / "tags.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    argv = ["build", "--data", str(data), "--model", str(syn / "model"), "--out", str(tmp_path / "out"),
            "--max-length", "400", "--device", "cpu"]
    code, line = run_script("prepare.py", argv, monkeypatch, capsys)
    assert code == 1 and line.startswith(f"error: {len(BAD_TAGS) + 1} bad record(s); the first: {data} line 2 "
                                         f"(id {recs[1]['id']}): response: {BAD_TAGS[0][1]}"), line
    man = prepare.main(argv + ["--skip-bad"])   # each bad record is listed, the good one is built
    assert man["n_kept"] == 1 and [(s["line"], s["field"]) for s in man["skipped"]] == \
        [(2 + j, "response") for j in range(len(BAD_TAGS))] + [(len(recs), "length")]
    for s, (_, msg) in zip(man["skipped"], BAD_TAGS):
        assert msg in s["reason"], (s, msg)
    assert man["skipped"][-1]["reason"].startswith("expected at most 400 tokens (--max-length), found ")
    err = capsys.readouterr().err
    assert f"{data} line {len(recs)} (id {long['id']}): length: expected at most 400 tokens" in err


def test_build_decodes_within_a_pixel_budget(syn, tmp_path, monkeypatch):
    """Memory follows the pixels in flight, not the worker count: with a budget smaller than any image, 4 workers
    decode one image at a time (an image over the budget runs alone)."""
    recs = _good_lines(syn, 6)
    busy, peak, lock = [0], [0], threading.Lock()
    real = prepare.model.load_image

    def load_image(path):
        with lock:
            busy[0] += 1
            peak[0] = max(peak[0], busy[0])
        time.sleep(0.02)   # long enough for the other workers to try to start
        try:
            return real(path)
        finally:
            with lock:
                busy[0] -= 1
    monkeypatch.setattr(prepare.model, "load_image", load_image)
    data = tmp_path / "few.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    opts = prepare.BuildOptions(data=str(data), model=str(syn / "model"), out=str(tmp_path / "out"), workers=4,
                                min_pixels=3136, max_pixels=1003520)
    prepare.read_records(replace(opts, decode_pixels=1), prepare.model.PRESETS["tiny"].vision)
    assert peak[0] == 1
    peak[0] = 0
    prepare.read_records(opts, prepare.model.PRESETS["tiny"].vision)   # the default budget: 4 at once
    assert peak[0] > 1
