"""VLMEvalKit's own matching, scoring and prompt code as a test oracle, from the PyPI package ms-vlmeval installed
without its dependencies (requirements-oracle.txt). Importing `vlmeval` would pull torch/transformers/openai/...
through its __init__, so the functions are read out of the specific source files (ast) and run unchanged, with the
few names they use from elsewhere in VLMEvalKit (process_punctuation, istype, ...) read the same way.

    .venv/bin/python -m pytest -q tests/test_vlmeval.py
"""
import ast
import base64
import copy
import importlib.util
import io
import logging
import os
import random
import re
import string
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
from PIL import Image


def package_root():
    spec = importlib.util.find_spec("vlmeval")      # found, not imported: its __init__ needs the whole stack
    if spec is None:
        raise RuntimeError("the test-only package ms-vlmeval is missing: "
                           "pip install --no-deps -r requirements-oracle.txt")
    return Path(spec.submodule_search_locations[0])


def load(relpath, names, ns):
    """Run the top-level functions (or Class.method, renamed Class_method) `names` of vlmeval/<relpath> in `ns`."""
    path = package_root() / relpath
    tree = ast.parse(path.read_text(encoding="utf-8"))
    keep, found = [], set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name in names:
            keep.append(node)
            found.add(node.name)
        elif isinstance(node, ast.ClassDef):
            for sub in node.body:
                if isinstance(sub, ast.FunctionDef) and f"{node.name}.{sub.name}" in names:
                    found.add(f"{node.name}.{sub.name}")
                    sub.name = f"{node.name}_{sub.name}"
                    keep.append(sub)
    assert found == set(names), f"{path}: {set(names) - found} not found (VLMEvalKit changed?)"
    exec(compile(ast.Module(body=keep, type_ignores=[]), str(path), "exec"), ns)
    return ns


def oracle():
    """-> namespace with VLMEvalKit's eval_vanilla, YOrN_Extraction, process_line, hit_calculate, the two dataset
    build_prompt methods and decode_base64_to_image."""
    ns = {"cp": copy, "os": os, "re": re, "string": string, "np": np, "pd": pd, "rd": random, "Optional": Optional,
          "base64": base64, "io": io, "Image": Image, "logger": logging.getLogger("vlmeval-oracle")}
    load("smp/misc.py", ["process_punctuation", "istype", "listinstr", "cn_string", "toliststr"], ns)
    load("smp/vlm.py", ["decode_base64_to_image", "build_option_str"], ns)
    load("utils/matching_util.py", ["can_infer_option", "can_infer_text", "can_infer", "can_infer_sequence",
                                    "can_infer_lego"], ns)
    load("dataset/utils/multiple_choice.py", ["build_choices", "extract_answer_from_item", "eval_vanilla",
                                              "build_prompt", "build_prompt_cn", "build_prompt_blink",
                                              "build_prompt_wemath", "build_prompt_LEGO"], ns)
    load("dataset/utils/yorn.py", ["YOrN_Extraction"], ns)
    load("dataset/utils/vqa_eval.py", ["_process_digit_article", "process_answer", "relaxed_correctness",
                                       "levenshtein_distance", "anls_compute", "process_line", "hit_calculate"], ns)
    load("dataset/image_base.py", ["ImageBaseDataset.build_prompt"], ns)
    load("dataset/image_mcq.py", ["ImageMCQDataset.build_prompt"], ns)
    return ns


class FakeDataset:
    """`self` for the dataset build_prompt methods: images already dumped (one path per row)."""
    meta_only = False

    def dump_image(self, line):
        return [f"{line['index']}.png"]


def mcq_hit(ns, row, prediction, dataset="MMStar"):
    """VLMEvalKit's vanilla MCQ scoring of one row with judge exact_matching (model None) -> (hit, option)."""
    item = row.copy()
    item["prediction"] = str(prediction)
    item["GT"] = row["answer"]
    res = ns["extract_answer_from_item"](None, item, dataset)
    return ns["eval_vanilla"](None, item, dataset)["hit"], res["opt"]


def yorn_hit(ns, answer, prediction):
    extracted = ns["YOrN_Extraction"](str(prediction))
    return bool(pd.Series([answer]).eq(pd.Series([extracted]))[0]), extracted


def vqa_hit(ns, answer, prediction, dataset):
    method = ("vqa_score" if "TextVQA" in dataset else "relaxed_accuracy" if "ChartQA" in dataset
              else "accuracy" if ("OCRVQA" in dataset or "GQA" in dataset)
              else "anls" if ("DocVQA" in dataset or "InfoVQA" in dataset) else "vqa_score")
    line = pd.Series({"answer": str(answer), "prediction": str(prediction)})
    res = ns["process_line"](line, method=method)
    return float(ns["hit_calculate"]([res], dataset)[0])


def prompt_text(ns, row, kind):
    """The text part of the message VLMEvalKit builds for the row (Qwen2.5-VL: use_custom_prompt=False)."""
    fn = ns["ImageMCQDataset_build_prompt"] if kind == "MCQ" else ns["ImageBaseDataset_build_prompt"]
    msgs = fn(FakeDataset(), row)
    assert [m["type"] for m in msgs] == ["image", "text"]
    return msgs[1]["value"]
