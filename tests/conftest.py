"""pytest setup shared by all test files: repo root on sys.path, fixed seeds, a parity-difference recorder.

    .venv/bin/python -m pytest -q tests                       # the whole suite (CPU, tiny configs)
    .venv/bin/python -m pytest -q tests/test_model.py -s      # -s also prints the parity table at the end
"""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)              # tests import model, latent_head, prepare, ... as top-level modules
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # and the helpers in tests/ (hf_tiny)

torch.set_num_threads(min(2, torch.get_num_threads()))  # the machine is shared: 2 cores

# Largest difference seen per (test, quantity), printed in the terminal summary.
PARITY = {}


def record(name, a, b):
    """Max |a - b| (as float32) recorded under `name` for the current test; returns it."""
    diff = (a.detach().float() - b.detach().float()).abs().max().item() if a.numel() else 0.0
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0].split("::")[-1]
    key = f"{test} :: {name}"
    PARITY[key] = max(PARITY.get(key, 0.0), diff)
    return diff


def assert_close(name, a, b, atol=1e-5):
    """Record and assert max |a - b| <= atol, with shapes checked first."""
    assert tuple(a.shape) == tuple(b.shape), f"{name}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    diff = record(name, a, b)
    assert diff <= atol, f"{name}: max |diff| = {diff:.3g} > atol {atol:g}"


@pytest.fixture(scope="session")
def syn(tmp_path_factory):
    """`prepare.py synthetic` once per session (24 records, its tiny checkpoint and prepared folder), shared read-only
    by every test file that needs a model folder or a small dataset on disk."""
    import prepare
    out = tmp_path_factory.mktemp("syn")
    prepare.synthetic(prepare.SyntheticOptions(out=str(out), n=24, seed=7, device="cpu"))
    return out


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_terminal_summary(terminalreporter, config):
    if not PARITY or (config.option.capture != "no" and config.option.verbose <= 0):
        return  # only with -s or -v
    terminalreporter.section("parity: largest |difference| per test")
    width = max(len(k) for k in PARITY)
    for k, v in PARITY.items():
        terminalreporter.write_line(f"{k:<{width}}  {v:.3g}")
