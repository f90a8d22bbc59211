"""VLMEvalKit-compatible benchmarks: its TSV layout, the prompts it gives Qwen2.5-VL, and its exact-matching scores,
so that `eval.py --scoring vlmeval` numbers are comparable with VLMEvalKit's
(https://github.com/open-compass/VLMEvalKit).

    python eval.py --model out/gap-7b --data MMStar.tsv --scoring vlmeval --min-pixels 1003520 --max-pixels 12845056
    .venv/bin/python -m pytest -q tests/test_vlmeval.py     # against VLMEvalKit's own code (PyPI ms-vlmeval)

What is reproduced, and from where in VLMEvalKit:
- reading: `pandas.read_csv(sep="\\t")` (vlmeval/smp/file.py `load`): the default NA strings ("", "NA", "N/A",
  "None", "nan", ...) make a cell empty, and a column whose filled cells are all numbers becomes numeric, so an option
  "3" in a column with an empty cell prints as "3.0" (float64), as in VLMEvalKit. Rows without an image are dropped
  (ImageBaseDataset `skip_noimg`); an image of <= 64 characters is the index of the row holding it; images are decoded
  with `convert("RGB")` for RGBA/P/LA (smp/vlm.py `decode_base64_to_image`: transparency dropped, not composited).
- prompts: VLMEvalKit runs Qwen2.5-VL with `use_custom_prompt=False` (vlmeval/config.py), so the dataset's prompt is
  used: multiple choice "Hint: ...\\nQuestion: ...\\nOptions:\\nA. ...\\nPlease select the correct answer from the
  options above. \\n" (ImageMCQDataset.build_prompt), otherwise the question as is (ImageBaseDataset.build_prompt;
  AMBER appends "\\nPlease answer yes or no.").
- scoring with `judge = exact_matching` (no LLM judge): multiple choice by option letter, else by option text
  (utils/matching_util.py `can_infer`), an unmatched answer counts wrong ("Z"); yes/no by the words "yes"/"no"
  after VQA punctuation handling (dataset/utils/yorn.py `YOrN_Extraction`), "Unknown" counts wrong; short answers by
  the dataset's rule (dataset/image_vqa.py): ChartQA relaxed accuracy (5 % relative, "12%" read as 0.12),
  OCRVQA/GQA case-insensitive exact match, DocVQA/InfoVQA ANLS (0.5 threshold).
Not reproduced (refused with a message): the VQA score of TextVQA-style datasets, circular MCQ evaluation (MMBench,
CCBench), LLM judges, multi-image rows. The per-row scores are VLMEvalKit's; the dataset-specific aggregates of MME,
HallusionBench and POPE are not computed (eval.py reports the mean, VLMEvalKit's "Overall" elsewhere).
"""
import ast
import base64
import binascii
import csv
import io
import re
import string
import sys
from pathlib import Path

from PIL import Image
from tqdm import tqdm

import model

# ---------------------------------------------------------------------------------------------------------------
# ---- reading a TSV the way pandas.read_csv(sep="\t") does ----

# pandas' default na_values: a cell equal to one of these (no stripping) is empty
NA_STRINGS = frozenset({"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
                        "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"})
_INT = re.compile(r"\s*[+-]?\d+\s*")         # pandas reads " 3" and "+3" as the integer 3
# pandas' float parser also takes exponents (1e3), a bare ".5", and inf / infinity in any case
_FLOAT = re.compile(r"\s*[+-]?(?:(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|inf|infinity)\s*", re.I)
_BOOL = {"True": True, "TRUE": True, "true": True, "False": False, "FALSE": False, "false": False}
LETTERS = string.ascii_uppercase


def _column(cells):
    """Cells of one column (None = NA) -> the Python values pandas' type inference gives them: all ints -> int
    (float if some cell is empty: int64 cannot hold NaN), all numbers -> float, all booleans -> bool, else str."""
    filled = [c for c in cells if c is not None]
    if filled and all(_INT.fullmatch(c) for c in filled):
        if any(abs(int(c)) >= 2 ** 64 for c in filled):       # past (u)int64: pandas keeps the text
            cast = str
        else:
            cast = int if len(filled) == len(cells) else (lambda c: float(int(c)))
    elif filled and all(_FLOAT.fullmatch(c) for c in filled):
        cast = float
    elif filled and all(c in _BOOL for c in filled):
        cast = _BOOL.get
    else:
        cast = str
    return [None if c is None else cast(c) for c in cells]


def _rows(path):
    """-> header, [(line number, cells)] with csv's quoting (like pandas': '"' opens a quoted field at the start of a
    cell). A quote that never closes would swallow the following rows into one cell: a quoted cell whose continuation
    lines hold tabs, or a file ending inside a quote, is an error naming the line where the quote opened."""
    csv.field_size_limit(sys.maxsize)          # one base64 image is far over csv's 128 KB default field limit
    raw = Path(path).read_text(encoding="utf-8")
    reader = csv.reader(io.StringIO(raw, newline=""), delimiter="\t", quotechar='"', doublequote=True, strict=True)
    rows, start = [], 1
    try:
        for cells in reader:
            for c in cells:
                if "\n" in c and "\t" in c.split("\n", 1)[1]:
                    raise model.data_error(path, "quote", f"expected a closing '\"', found a quoted cell running over "
                                           f"{c.count(chr(10))} lines that hold tabs: an unclosed quote swallowing "
                                           f"rows", line=start)
            rows.append((start, cells))
            start = reader.line_num + 1
    except csv.Error as e:
        raise model.data_error(path, "quote", f"expected a closing '\"', found {e} (an unclosed quote)",
                               line=start) from None
    if not rows:
        raise model.data_error(path, "header", "expected a header row, found an empty file")
    (_, header), body = rows[0], rows[1:]
    return header, [(ln, cells) for ln, cells in body if cells]


def read_table(path):
    """-> list of row dicts {column: value (None where pandas has NaN)} plus '_line', typed column by column."""
    header, body = _rows(path)
    for ln, cells in body:
        if len(cells) > len(header):            # pandas: "Expected N fields, saw M"; fewer cells are NaN-filled
            raise model.data_error(path, "row", f"expected at most {len(header)} cells, found {len(cells)}", line=ln)
    columns = {h: _column([None if j >= len(cells) or cells[j] in NA_STRINGS else cells[j] for _, cells in body])
               for j, h in enumerate(header)}
    return [{"_line": ln, **{h: columns[h][i] for h in header}} for i, (ln, _) in enumerate(body)]


def text(v):
    """A cell as VLMEvalKit's f-strings and str() print it (3 -> "3", 3.0 -> "3.0", True -> "True")."""
    return str(v)


# ---------------------------------------------------------------------------------------------------------------
# ---- records: task type, images, prompts ----


def task_type(rows):
    """MCQ when the file has filled option columns, Y/N when every answer is Yes/No, else VQA (VLMEvalKit decides by
    dataset name; these are the same families)."""
    if any(r.get(c) is not None for r in rows for c in "AB"):
        return "MCQ"
    answers = [r.get("answer") for r in rows if r.get("answer") is not None]
    if answers and all(text(a) in ("Yes", "No") for a in answers):
        return "Y/N"
    return "VQA"


def build_prompt(row, kind, dataset):
    """The text VLMEvalKit puts after the image for Qwen2.5-VL (use_custom_prompt=False: the dataset's prompt)."""
    if kind != "MCQ":
        q = text(row["question"])
        return q + "\nPlease answer yes or no." if dataset == "AMBER" else q
    options = {c: row[c] for c in LETTERS if row.get(c) is not None}
    prompt = f"Hint: {text(row['hint'])}\n" if row.get("hint") is not None else ""
    prompt += f"Question: {text(row['question'])}\n"
    if options:
        prompt += "Options:\n" + "".join(f"{c}. {text(v)}\n" for c, v in options.items())
        prompt += "Please select the correct answer from the options above. \n"
    return prompt


def decode_image(b64, path, line=None, rid=None):
    """base64 -> PIL image as VLMEvalKit opens it: RGBA, P and LA converted to RGB (alpha dropped)."""
    try:
        # validate=False, base64's default: characters outside the alphabet (line breaks in a wrapped cell) are skipped
        img = Image.open(io.BytesIO(base64.b64decode(b64, validate=False)))
        if img.width * img.height > model.MAX_DECODE_PIXELS:
            raise ValueError(f"{img.width}x{img.height} is over the {model.MAX_DECODE_PIXELS} pixel cap")
        img.load()
    except (binascii.Error, ValueError, OSError, SyntaxError) as e:
        why = str(e).split(" <_io.")[0]         # PIL names the BytesIO object; that says nothing to a user
        raise model.data_error(path, "image", f"expected a base64 image, found undecodable data "
                                              f"({type(e).__name__}: {why})", line=line, rid=rid) from None
    return img.convert("RGB") if img.mode in ("RGBA", "P", "LA") else img


def read_records(path):
    """A VLMEvalKit TSV -> (records, task type, dataset name). Records: {id, image_b64, question (the prompt), answer
    (None: predictions only), category, choices, kind, where (file, line)}. Every image is decoded once here, so a
    broken one stops the run before any generation."""
    path = Path(path)
    dataset = path.stem
    rows = read_table(path)
    for col in ("index", "image", "question"):
        if rows and col not in rows[0]:
            raise model.data_error(path, "columns", f"expected a column {col!r}, found "
                                                    f"{[c for c in rows[0] if c != '_line']}")
    n_all = len(rows)
    rows = [r for r in rows if r["image"] is not None]   # VLMEvalKit drops rows without an image (skip_noimg)
    if len(rows) < n_all:
        print(f"{path}: {n_all - len(rows)} row(s) without an image left out, as VLMEvalKit does", file=sys.stderr)
    kind = task_type(rows)
    seen = set()
    for r in rows:   # the index keys the predictions (and image references): a repeat would mix two questions
        if text(r["index"]) in seen:
            raise model.data_error(path, "index", f"expected unique values, found {text(r['index'])!r} twice")
        seen.add(text(r["index"]))
    # every row's image by index first: a short cell refers to another row's image, possibly a later one
    images = {text(r["index"]): text(r["image"]) for r in rows}
    records = []
    for r in tqdm(rows, desc="check images", disable=len(rows) < 256):
        rid = text(r["index"])
        at = {"line": r["_line"], "rid": rid}
        b64 = images[rid]
        if len(b64) <= 64:                      # a reference to the row that holds the image
            if len(images.get(b64, "")) <= 64:
                raise model.data_error(path, "image", f"expected base64 or the index of a row with an image, found "
                                                      f"{b64!r}", **at)
            b64 = images[b64]
        if b64.startswith("[") and b64.endswith("]"):
            raise model.data_error(path, "image", "expected one image, found a list of images (gap prompts with one "
                                                  "image per question)", **at)
        decode_image(b64, path, **at).close()
        choices = {c: text(r[c]) for c in LETTERS if r.get(c) is not None} if kind == "MCQ" else None
        records.append({"id": rid, "image_b64": b64, "where": (str(path), r["_line"]),
                        "question": build_prompt(r, kind, dataset),
                        "answer": None if r.get("answer") is None else text(r["answer"]),
                        "category": text(r.get("category") if r.get("category") is not None else "all"),
                        "choices": choices, "kind": kind, "response": None, "raw": None})
    return records, kind, dataset


# ---------------------------------------------------------------------------------------------------------------
# ---- exact matching ----

_REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
             "I'm sorry, but without the image provided", "Cannot determine the answer")


def match_option_letter(answer, choices):
    """The option letter a response names, 'Z' for a refusal, or None. The response is split into words after turning
    .()[],:;!*#{} into spaces; exactly one word must be an option letter, and it must be among the last 5 words (so
    "The answer is C, not A." names two letters and matches nothing)."""
    if "Failed to obtain answer via API" in answer:
        return None
    if any(r in answer for r in _REFUSALS):
        return "Z"
    words = answer.translate(str.maketrans({c: " " for c in ".()[],:;!*#{}"})).split()
    named = [c for c in choices if c in words]
    if len(named) == 1:
        for c in choices:                       # the first option letter present, as VLMEvalKit loops over choices
            if c in words and words.index(c) > len(words) - 5:
                return c
        return None
    if not named and "Z" in words:             # count of {'Z', ''} == 1; '' is never a word after split()
        return "Z"
    return None


def match_option_text(answer, choices):
    """The one option whose text occurs in a response at most twice as long as all option texts together."""
    answer = answer.lower()
    if len(answer) > 2 * sum(len(v) for v in choices.values()):
        return None
    hits = [c for c, v in choices.items() if v.lower() in answer]
    return hits[0] if len(hits) == 1 else None


def match_choice(prediction, choices):
    """VLMEvalKit's can_infer: by letter, else by option text; None when nothing matches (scored as 'Z')."""
    return match_option_letter(prediction, choices) or match_option_text(prediction, choices)


def process_punctuation(s):
    """VQA punctuation handling (VLMEvalKit smp `process_punctuation`, from the VQA evaluation code)."""
    out = s
    comma_digits = re.search(r"(\d)(,)(\d)", s) is not None
    for p in (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
              "!"):
        out = out.replace(p, "" if (p + " " in s or " " + p in s or comma_digits) else " ")
    # periods not next to a digit go; the original passes re.UNICODE (32) as sub's `count`: only the first 32
    return re.sub(r"(?<!\d)\.(?!\d)", "", out, count=32)


def match_yes_no(prediction):
    """'Yes' / 'No' when exactly one of the words occurs, else 'Unknown' (scored wrong)."""
    words = process_punctuation(prediction.lower()).split()
    if "yes" in words and "no" not in words:
        return "Yes"
    if "no" in words and "yes" not in words:
        return "No"
    return "Unknown"


def _to_float(s):
    try:
        return float(s[:-1]) / 100.0 if s.endswith("%") else float(s)   # "12%" -> 0.12
    except ValueError:
        return None


def relaxed_correct(target, prediction, max_relative_change=0.05):
    """ChartQA's relaxed accuracy (Methani et al. 2020): numbers within 5 % of a non-zero target, else exact match
    ignoring case."""
    p, t = _to_float(prediction), _to_float(target)
    if p is not None and t:
        return abs(p - t) / abs(t) <= max_relative_change
    return prediction.lower() == target.lower()


def _levenshtein(a, b):
    if len(a) > len(b):
        a, b = b, a
    # one row of the edit-distance table at a time, over the shorter string: O(len a x len b) time, O(min) memory
    row = list(range(len(a) + 1))
    for i, cb in enumerate(b):
        new = [i + 1]
        for j, ca in enumerate(a):
            new.append(row[j] if ca == cb else 1 + min(row[j], row[j + 1], new[-1]))
        row = new
    return row[-1]


def anls_distance(target, prediction):
    """Normalised Levenshtein distance after lower-casing and collapsing spaces (ANLS uses 1 - this)."""
    t, p = " ".join(target.strip().lower().split()), " ".join(prediction.strip().lower().split())
    # normalised by the raw strings' lengths (before stripping), as VLMEvalKit's anls_compute; upper() can change a
    # length ("ß" -> "SS"), and it is kept for the same numbers
    n = max(len(target.upper()), len(prediction.upper()))
    return 0.0 if n == 0 else _levenshtein(t, p) / n


def vqa_method(dataset):
    # by substring of the file's stem, as VLMEvalKit names its variants (ChartQA_TEST.tsv is ChartQA)
    for names, method in ((("TextVQA",), "vqa_score"), (("ChartQA",), "relaxed_accuracy"),
                          (("OCRVQA", "GQA"), "accuracy"), (("DocVQA", "InfoVQA"), "anls")):
        if any(n in dataset for n in names):
            return method
    return "vqa_score"


def _answers(answer):
    """A cell holding a Python list literal is several reference answers (VLMEvalKit evaluates it)."""
    try:
        # literal_eval, never eval: the cell is data, and only Python literals are parsed
        v = ast.literal_eval(answer)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return [answer]
    return [text(x) for x in v] if isinstance(v, list) else [answer]


def check_supported(kind, path):
    """Raise a DataError for a benchmark whose VLMEvalKit scoring --scoring vlmeval does not reproduce."""
    dataset = Path(path).stem
    if kind == "VQA" and vqa_method(dataset) == "vqa_score":
        raise model.data_error(path, "scoring", f"expected a dataset VLMEvalKit scores by exact matching, found "
                                                f"{dataset!r}, scored with the VQA score (10 annotator answers and a "
                                                f"contraction table), which gap does not reproduce; use --scoring gap")
    if kind == "MCQ" and any(n in dataset.lower() for n in ("mmbench", "ccbench", "circular", "mmcr")):
        raise model.data_error(path, "scoring", f"expected a dataset VLMEvalKit scores by exact matching, found "
                                                f"{dataset!r}, scored with circular evaluation (a question counts "
                                                f"only if all its rotated copies are right), which gap does not "
                                                f"reproduce; use --scoring gap")


def score(prediction, rec, dataset):
    """-> (score in [0, 1], what was extracted) for one record, as VLMEvalKit's exact matching scores it."""
    answer = rec["answer"]
    if rec["kind"] == "MCQ":
        got = match_choice(prediction, dict(rec["choices"])) or "Z"
        return float(got == answer), got
    if rec["kind"] == "Y/N":
        got = match_yes_no(prediction)
        ok = got.lower() == answer.lower() if "AMBER" in dataset else got == answer
        return float(ok), got
    method, refs = vqa_method(dataset), _answers(answer)
    pred = prediction.strip()
    if method == "relaxed_accuracy":            # ChartQA: right if any reference is
        return float(max(relaxed_correct(t, pred) for t in refs)), pred
    if method == "accuracy":
        # the fraction of references matched: two references, one of them matched, score 0.5
        return sum(t.strip().lower() == pred.lower() for t in refs) / len(refs), pred
    if method == "anls":                        # DocVQA/InfoVQA: best similarity, 0 below 0.5
        s = 1 - min(anls_distance(t, prediction) for t in refs)
        return (0.0 if s < 0.5 else s), prediction
    raise model.data_error(dataset, "scoring", f"expected a reproduced VQA method, found {method!r}")
