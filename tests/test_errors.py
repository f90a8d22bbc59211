"""Bad input: every expected failure ends in one line on stderr, `error: <where>: <field>: <expected, found>`, and a
non-zero exit code, with no traceback (--debug shows it); nothing is lost or overwritten silently. One test per class
of failure, each run through the script's own `__main__` block.

    .venv/bin/python -m pytest -q tests/test_errors.py
"""
import runpy
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import prepare  # noqa: E402
import train  # noqa: E402


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn")
    prepare.synthetic(prepare.SyntheticOptions(out=str(out), n=24, seed=7, device="cpu"))
    return out


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


def test_a_bug_keeps_its_traceback():
    def buggy(argv):
        return {}["missing"]
    with pytest.raises(KeyError):
        prepare.run_main(buggy, [])
