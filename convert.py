"""Public data in gap's JSONL format: Monet-SFT-125K and box-grounded visual CoT (Visual-CoT, LVR), streamed.

    python prepare.py convert --from monet --data Monet-SFT-125K/Visual_CoT/train.json --images Monet-SFT-125K \\
        --out data/monet/Visual_CoT.jsonl
    python prepare.py convert --from bbox --data viscot_363k.json --images playground/data --out data/viscot.jsonl
    python prepare.py convert --from bbox --data lvr_stage1.json --images IMAGE_FOLDER --out data/lvr/train.jsonl
    .venv/bin/python -m pytest -q tests/test_convert.py

Every input record becomes one gap record (`id, image, question, response, aux_images, answer, accuracy`, absolute
paths) or is dropped with a reason: each drop is printed on stderr and listed in OUT.dropped (JSON lines), nothing
is lost silently. A record that breaks the input layout itself (a missing or mistyped field) stops the run with one
line naming the file, the line, the record id and the field. `accuracy` is left null: `prepare.py score` fills it
with the base model's mean accuracy over 8 samples. Ids are stable (taken from the record, else "<folder>-<index>"),
OUT is written to OUT.tmp and renamed at the end, and the input is read one record at a time: JSONL line by line, a
top-level JSON array (Monet's train.json) by an incremental decoder that holds one 1 MB chunk plus the record being
parsed, so a 125K-record file is never in memory at once (125K Monet-layout records, a 149 MB array: 77-97 s on a
shared CPU core, 30 MB above the 235 MB that importing torch costs).
"""
import json
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

import model
import prepare
from model import DataError, data_error
from prepare import LATENT_PLACEHOLDER, BadRecord

LAYOUTS = ("monet", "bbox")

# ---- options and errors ----


@dataclass
class ConvertPaths:
    data: str = field(metadata={"help": "input: a JSON array (Monet's train.json) or JSONL, one record per line"})
    images: str = field(metadata={"help": "folder the records' image paths are relative to (Monet: the dataset "
                                          "root; Visual-CoT: the folder holding cot/; LVR: its --image_folder)"})
    out: str = field(metadata={"help": "output JSONL; bbox crops go to OUT-crops/, the dropped list to OUT.dropped"})


@dataclass
class ConvertOptions(ConvertPaths):
    source: str = field(metadata={"help": "input layout: monet | bbox"})


def add_arguments(parser):
    """Flags from the dataclasses like every gap script, except `--from` (a Python keyword: dest `source`)."""
    parser.add_argument("--from", dest="source", required=True, choices=LAYOUTS,
                        help=ConvertOptions.__dataclass_fields__["source"].metadata["help"])
    prepare.add_options(parser, ConvertPaths)


class Malformed(Exception):
    """The record breaks the input layout (not just unusable for gap): the run stops with a one-line error."""

    def __init__(self, field_, reason):
        super().__init__(reason)
        self.field, self.reason = field_, reason


def _type(v):
    # 40 characters: enough to recognise the value, short enough to keep the error on one line
    return f"{json.dumps(v)[:40]} ({type(v).__name__})"


def _need(obj, key, kind, at):
    """obj[key] of Python type `kind`, else Malformed naming the field path `at`."""
    if not isinstance(obj, dict) or key not in obj:
        raise Malformed(at, f"expected a {kind.__name__}, found nothing")
    # bool is a subclass of int in Python: a JSON true must not pass as a number
    if not isinstance(obj[key], kind) or isinstance(obj[key], bool):
        raise Malformed(at, f"expected a {kind.__name__}, found {_type(obj[key])}")
    return obj[key]


# ---- streaming reader: JSONL or one top-level JSON array ----

CHUNK = 1 << 20   # characters per read; a record is parsed once it is whole in the buffer
_WS = re.compile(r"\s*")


def read_records(path):
    """Yield (line where the record starts, index from 0, parsed value). Invalid JSON or UTF-8 raises DataError."""
    with open(path, "rb") as f:
        head = f.read(4096).decode("utf-8-sig", errors="ignore").lstrip()[:1]
    if head != "[":   # JSONL (Monet's own loader takes both; LVR ships JSON arrays)
        for index, (line, text) in enumerate(prepare.jsonl_lines(path)):
            try:
                yield line, index, json.loads(text)
            except json.JSONDecodeError as e:
                raise data_error(path, "json", f"expected one JSON value per line, found invalid JSON "
                                               f"({e.msg} at column {e.colno})", line) from None
        return
    with open(path, encoding="utf-8-sig") as f:   # -sig: a byte-order mark some Windows editors write
        try:
            yield from _read_array(f, f.read(CHUNK), path)
        except UnicodeDecodeError as e:
            raise data_error(path, "text", f"expected UTF-8, found byte 0x{e.object[e.start]:02x}") from None


def _read_array(f, buf, path):
    """The values of a top-level JSON array, one at a time, via json's raw_decode on a sliding buffer."""
    # a small state machine over a sliding text buffer: `expect` is what may come next (a value, or ", or ]" after
    # one), `line` the line the next record starts on (for error messages), `pos` the first unparsed character
    dec, pos = json.JSONDecoder(), buf.index("[") + 1
    line, eof, index, expect = 1 + buf.count("\n", 0, pos), False, 0, "value or ]"

    def refill():   # drop what is parsed, read more (at least as much again: a huge record costs O(n log n))
        nonlocal buf, pos, eof
        more = f.read(max(CHUNK, len(buf) - pos))
        eof = not more
        buf, pos = buf[pos:] + more, 0

    while True:
        start = _WS.match(buf, pos).end()
        line, pos = line + buf.count("\n", pos, start), start
        if pos == len(buf):
            if eof:
                raise data_error(path, "json", f"expected {expect}, found the end of the file", line)
            refill()
            continue
        c = buf[pos]
        if c == "]" and expect != "value":   # not right after a comma: a trailing comma is invalid JSON
            return
        if expect == ", or ]":
            if c != ",":
                raise data_error(path, "json", f"expected , or ] after record {index - 1}, found {c!r}", line)
            pos, expect = pos + 1, "value"
            continue
        try:
            obj, end = dec.raw_decode(buf, pos)
        except json.JSONDecodeError as e:
            # the record runs past the buffer (the error sits at its end, or a string is open): read on
            if not eof and (e.pos > len(buf) - 16 or e.msg.startswith("Unterminated string")):
                refill()
                continue
            at = line + e.lineno - 1 - buf.count("\n", 0, pos)   # e.lineno counts from the buffer's start
            raise data_error(path, "json", f"expected record {index} as JSON, found invalid JSON ({e.msg} at line "
                                           f"{at})", line) from None
        if end == len(buf) and not eof:   # a number or literal may continue in the next chunk: parse it again
            refill()
            continue
        yield line, index, obj
        line, pos, index, expect = line + buf.count("\n", pos, end), end, index + 1, ", or ]"


# ---- Monet-SFT-125K ----
# Layout followed: Monet's SFT loader, https://github.com/NOVAglow646/Monet/blob/main/src/task.py
# (avt_single_input_images_preprocess_function) and the dataset https://huggingface.co/datasets/NOVAglow646/
# Monet-SFT-125K (one <subset>/train.json per source, a JSON array). A record is
#   {"metadata": {"dataset_name": "Visual_CoT", "sample_id": 17},
#    "data": [{"role": "system", "content": [{"type": "text", "text": ...}]},
#             {"role": "user", "content": [{"type": "image", "image_file_name": "Visual_CoT/images/..."},
#                                          {"type": "text", "text": question}]},
#             {"role": "assistant", "content": [{"type": "text", "text": "... <abs_vis_token></abs_vis_token>"},
#                                               {"type": "image", "image_file_name": aux image},
#                                               {"type": "text", "text": "<observation>...</observation> ...
#                                                                         \\boxed{answer}"}]}]}
# with image paths relative to the dataset root. Monet's loader drops an assistant image whose preceding text
# lacks <abs_vis_token></abs_vis_token> and strips <observation> tags that come before any auxiliary image; so
# does this converter. "image" is accepted as the path key too (the key Monet's loader rewrites it to). The
# reasoning keeps its \boxed{...}; the boxed content is also the record's <answer>, which eval.py grades.

ABS_VIS = "<abs_vis_token></abs_vis_token>"


def last_boxed(text):
    """Content of the last \\boxed{...} (nested braces allowed), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    # brace counting, not a regex: \boxed{\frac{1}{2}} nests braces, which no regular expression can balance
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j].strip()
    return None


def _image_path(part, at):
    for key in ("image_file_name", "image"):
        if key in part:
            return _need(part, key, str, f"{at}.{key}")
    raise Malformed(f"{at}.image_file_name", "expected a string path, found nothing")


def _parts(turn, at):
    """-> [(kind, value)] of one turn: ("text", str) or ("image", path)."""
    out = []
    for j, part in enumerate(_need(turn, "content", list, f"{at}.content")):
        kind = _need(part, "type", str, f"{at}.content[{j}].type")
        if kind == "text":
            out.append(("text", _need(part, "text", str, f"{at}.content[{j}].text")))
        elif kind == "image":
            out.append(("image", _image_path(part, f"{at}.content[{j}]")))
        else:
            raise Malformed(f"{at}.content[{j}].type", f"expected 'text' or 'image', found {kind!r}")
    return out


def monet_id(obj, index, folder):
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    if isinstance(meta, dict) and meta.get("sample_id") is not None:
        return f"{meta.get('dataset_name') or folder}-{meta['sample_id']}"
    return f"{folder}-{index}"


def convert_monet(obj, images, index, crops):
    """One Monet record -> (question image, question, response, aux images, answer); raises Malformed/BadRecord."""
    if not isinstance(obj, dict):
        raise Malformed("record", f"expected an object with 'data', found {_type(obj)}")
    turns = _need(obj, "data", list, "data")
    by_role = {}
    for t, turn in enumerate(turns):
        by_role.setdefault(_need(turn, "role", str, f"data[{t}].role"), []).append((t, turn))
    for role in ("user", "assistant"):
        if len(by_role.get(role, [])) != 1:
            raise BadRecord("data", f"expected one {role} turn, found {len(by_role.get(role, []))}")
    (tu, user), (ta, assistant) = by_role["user"][0], by_role["assistant"][0]
    upart = _parts(user, f"data[{tu}]")
    qimages = [v for k, v in upart if k == "image"]
    if len(qimages) != 1:
        raise BadRecord(f"data[{tu}].content", f"expected 1 question image, found {len(qimages)}")
    question = "".join(v for k, v in upart if k == "text").strip()

    # assistant: "<abs_vis_token></abs_vis_token>" + image -> "<latent>"; <observation> -> <parser>
    text, aux, last = "", [], None   # last: the previous part when it was text (Monet checks that one)
    for k, v in _parts(assistant, f"data[{ta}]"):
        if k == "image":
            if last is None or ABS_VIS not in last:
                raise BadRecord(f"data[{ta}].content", f"aux image {len(aux)} is not preceded by {ABS_VIS}")
            cut = text.rfind(ABS_VIS)
            text, last = text[:cut] + LATENT_PLACEHOLDER + text[cut + len(ABS_VIS):], None
            aux.append(v)
        else:
            if not aux:   # an observation before any aux image observes nothing: Monet strips the tags
                v = v.replace("<observation>", "").replace("</observation>", "")
            text, last = text + v, v
    if ABS_VIS in text:
        raise BadRecord(f"data[{ta}].content", f"{ABS_VIS} not followed by an aux image")
    # the last \boxed{} is the final answer: a worked solution may box intermediate results before it
    answer = last_boxed(text)
    if answer is None:
        raise BadRecord(f"data[{ta}].content", "expected a final \\boxed{answer}, found none")
    text = text.replace("<observation>", "<parser>").replace("</observation>", "</parser>").strip()
    # a missing image is dropped here, with its line, rather than failing a training run hours in
    paths = [os.path.join(images, p) for p in qimages + aux]
    for p, name in zip(paths, ["image"] + [f"aux_images[{j}]" for j in range(len(aux))]):
        if not os.path.isfile(p):
            raise BadRecord(name, f"file not found: {p}")
    return paths[0], question, f"<think>{text}</think><answer>{answer}</answer>", paths[1:], answer


# ---- box-grounded visual CoT (LVR / Visual-CoT) ----
# Two LLaVA-style layouts, told apart per record (LVR's has "bboxes"). Each box's crop of the question image is
# written to OUT-crops/ and becomes the aux image, so the latent target is "the zoomed region"; its <parser> names
# the region by its normalised box.
#
# LVR's stage-1 SFT data, https://github.com/VincentLeebang/lvr (README "Dataset Preparation"; Visual-CoT
# re-formatted): a JSON array of
#   {"dataset": "flickr30k", "question_id": 31593, "image": ["viscot/flickr30k/2618322793.jpg"],
#    "conversations": [{"from": "human", "value": "<image>\nCan you describe ...?"},
#                      {"from": "gpt", "value": "<lvr>\n<answer> The child ... </answer>"}],
#    "bboxes": [[0.382, 0.456, 0.718, 0.656]]}
# boxes [x0, y0, x1, y1] normalised by the image's width and height (a box with a value > 1 is in pixels, as LVR's
# loader reads it); the i-th <lvr> is the i-th box's latent span (no <lvr>: every box's span opens the response).
#
# Visual-CoT's viscot_363k.json, https://huggingface.co/datasets/deepcs233/Visual-CoT, as written by its
# tools/convert_data_to_llava_format.py (https://github.com/deepcs233/Visual-CoT):
#   {"dataset": "gqa", "question_id": 7, "image": ["cot/gqa/1.jpg", "cot/gqa/1.jpg###[12, 40, 96, 120]"],
#    "conversations": [{"from": "human", "value": "<image>\nQuestion? Please provide the bounding box ..."},
#                      {"from": "gpt", "value": "[0.041, 0.213, 0.327, 0.482]"},
#                      {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "answer"}]}
# The box is read from the "###[...]" suffix, in pixels; the gpt box string is normalised on the image padded to a
# square (LLaVA's "pad" aspect), so it is not used.

LVR = "<lvr>"
VISCOT_PROMPTS = (" Please provide the bounding box coordinate of the region that can help you answer the question "
                  "better.", " Please think step by step and provide the bounding box coordinate of the region that "
                  "can help you answer the question better.")


def bbox_id(obj, index, folder):
    if isinstance(obj, dict) and isinstance(obj.get("id"), (str, int)) and not isinstance(obj.get("id"), bool):
        return str(obj["id"])
    if isinstance(obj, dict) and isinstance(obj.get("question_id"), (str, int)):
        return f"{obj.get('dataset') or folder}-{obj['question_id']}"
    return f"{folder}-{index}"


def _is_box(b):
    return isinstance(b, list) and len(b) == 4 and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                       for x in b)


def _turns(obj, roles):
    turns = _need(obj, "conversations", list, "conversations")
    for t, turn in enumerate(turns):
        _need(turn, "from", str, f"conversations[{t}].from")
        _need(turn, "value", str, f"conversations[{t}].value")
    if [t["from"] for t in turns] != roles:
        raise BadRecord("conversations", f"expected the turns {roles}, found {[t['from'] for t in turns]}")
    return [t["value"] for t in turns]


def _question(text):
    return text.replace("<image>\n", "").replace("<image>", "").strip()


def _lvr_fields(obj, image):
    """-> (question image, question, reasoning with one <lvr> per box, answer, boxes, in_pixels or None: per box)."""
    if len(image) != 1:
        raise BadRecord("image", f"expected 1 question image, found {len(image)}")
    boxes = _need(obj, "bboxes", list, "bboxes")
    for j, b in enumerate(boxes):
        if not _is_box(b):
            raise Malformed(f"bboxes[{j}]", f"expected [x0, y0, x1, y1] numbers, found {_type(b)}")
    human, reply = _turns(obj, ["human", "gpt"])
    # non-greedy with re.S: each <answer> block alone, across line breaks; the last one is the final answer
    found = re.findall(r"<answer>(.*?)</answer>", reply, flags=re.S)
    reasoning = re.sub(r"<answer>.*?</answer>", "", reply, flags=re.S).strip()
    answer = (found[-1] if found else reasoning.replace(LVR, "")).strip()
    if not found:
        reasoning = LVR * reasoning.count(LVR)   # a bare reply is the answer itself; keep only its spans
    n = reasoning.count(LVR)
    if n and n != len(boxes):
        raise BadRecord("bboxes", f"expected {n} boxes for {n} {LVR}, found {len(boxes)}")
    return image[0], _question(human), reasoning or LVR * len(boxes), answer, boxes, None


def _viscot_fields(obj, image):
    if len(image) != 2 or "###" not in image[1]:
        raise BadRecord("image", f"expected [image, 'image###[x0, y0, x1, y1]'], found {_type(image)}")
    path, _, box = image[1].partition("###")
    try:
        box = json.loads(box)
    except json.JSONDecodeError:
        box = None
    if not _is_box(box):
        raise Malformed("image[1]", f"expected a path###[x0, y0, x1, y1] in pixels, found {image[1][-60:]!r}")
    if path != image[0]:
        raise BadRecord("image[1]", f"expected a box on the question image {image[0]}, found one on {path}")
    human, _, _, answer = _turns(obj, ["human", "gpt", "human", "gpt"])
    for prompt in VISCOT_PROMPTS:   # the request for a box: the latent span answers it now
        human = human.replace(prompt, "")
    return image[0], _question(human), LVR, answer.strip(), [box], True


def _box(b, at, w, h, in_pixels):
    """-> pixel box (x0, y0, x1, y1) clamped to the image; BadRecord when nothing is left."""
    if in_pixels is None:
        in_pixels = max(b) > 1   # normalised unless some value says pixels
    scale = (1, 1, 1, 1) if in_pixels else (w, h, w, h)
    # clamped: an annotated box can run past the border, and PIL's crop pads the outside with black
    x0, y0, x1, y1 = (max(0, min(lim, round(v * s))) for v, s, lim in zip(b, scale, (w, h, w, h)))
    if x1 <= x0 or y1 <= y0:
        raise BadRecord(at, f"expected a box with area inside the {w}x{h} image, found {b}")
    return x0, y0, x1, y1


def convert_bbox(obj, images, index, crops):
    if not isinstance(obj, dict):
        raise Malformed("record", f"expected an object with 'image' and 'conversations', found {_type(obj)}")
    image = obj.get("image")
    image = [image] if isinstance(image, str) else image
    if not isinstance(image, list) or not all(isinstance(p, str) for p in image):
        raise Malformed("image", f"expected a path or a list of paths, found {_type(obj.get('image'))}")
    viscot = "bboxes" not in obj and len(image) == 2 and "###" in image[1]
    first, question, reasoning, answer, boxes, in_pixels = (_viscot_fields if viscot else _lvr_fields)(obj, image)
    if not answer:
        raise BadRecord("conversations", "expected an answer, found an empty reply")
    if not boxes:
        raise BadRecord("bboxes", "expected at least one box, found none")
    src = os.path.join(images, first)
    if not os.path.isfile(src):
        raise BadRecord("image", f"file not found: {src}")
    try:
        img = model.load_image(src)
    except ValueError as e:
        raise BadRecord("image", f"cannot use the image: {e}") from None
    w, h = img.size
    aux, spans = [], []
    for j, b in enumerate(boxes):
        x0, y0, x1, y1 = _box(b, "image[1]" if viscot else f"bboxes[{j}]", w, h, in_pixels)
        path = crops / f"{index:07d}-{j}.png"   # the input position: stable for the same file, no id clash
        tmp = path.with_name(path.name + ".tmp.png")
        # PNG: lossless, so the crop is exactly the question image's pixels; RGB: palette / alpha images saved uniformly
        img.crop((x0, y0, x1, y1)).convert("RGB").save(tmp)
        os.replace(tmp, path)
        aux.append(str(path))
        spans.append(f"{LATENT_PLACEHOLDER} <parser>the region [{x0 / w:.2f}, {y0 / h:.2f}, {x1 / w:.2f}, "
                     f"{y1 / h:.2f}] of the image, zoomed in</parser>")
    img.close()
    pieces = reasoning.split(LVR)
    # the i-th <lvr> marker becomes the i-th box's span, in the reply's own order
    text = pieces[0] + "".join(s + p for s, p in zip(spans, pieces[1:]))
    return src, question, f"<think>{text.strip()}</think><answer>{answer}</answer>", aux, answer


# layout -> (record id, converter(obj, images root, input index, crops folder) -> gap fields)
CONVERTERS = {"monet": (monet_id, convert_monet), "bbox": (bbox_id, convert_bbox)}


# ---- the run ----


def convert(opts):
    """Stream opts.data -> opts.out (atomic). Returns {"kept": n, "dropped": [...]}."""
    data, out, images = Path(opts.data), Path(opts.out), Path(opts.images)
    if opts.source not in CONVERTERS:
        raise DataError(f"--from: expected one of {', '.join(LAYOUTS)}, found {opts.source!r}")
    if not data.is_file():
        raise data_error(data, "--data", "expected an input file, found none")
    if not images.is_dir():
        raise data_error(images, "--images", "expected a folder, found none")
    out.parent.mkdir(parents=True, exist_ok=True)
    crops = out.with_name(out.stem + "-crops")
    if opts.source == "bbox":
        crops.mkdir(exist_ok=True)
    make_id, make = CONVERTERS[opts.source]
    folder = data.resolve().parent.name   # Monet's own fallback dataset name: the subset folder
    seen, dropped, kept = {}, [], 0
    # absolute paths (gap resolves a path against the JSONL's folder, and an absolute one stays itself): converted
    # files can be concatenated or scored into any folder without breaking a path
    absolute = os.path.abspath   # not resolve(): its lstat per path component was half the run time
    tmp = out.with_name(out.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for line, index, obj in tqdm(read_records(data), desc="convert", unit="rec", disable=None):
                rid = make_id(obj, index, folder)
                try:
                    if rid in seen:
                        raise BadRecord("id", f"duplicate of line {seen[rid]}")
                    image, question, response, aux, answer = make(obj, images, index, crops)
                    rec = {"id": rid, "image": absolute(image), "question": question, "response": response,
                           "aux_images": [absolute(a) for a in aux], "answer": answer, "accuracy": None}
                    prepare._check_fields(rec, out.parent)   # build's own record checks: it passes unchanged
                except Malformed as e:
                    raise data_error(data, e.field, e.reason, line, rid) from None
                except BadRecord as e:
                    dropped.append({"line": line, "id": rid, "field": e.field, "reason": e.reason})
                    print(f"dropped: {data_error(data, e.field, e.reason, line, rid)}", file=sys.stderr)
                    for crop in crops.glob(f"{index:07d}-*.png"):   # a bbox record's crops, if any were written
                        crop.unlink()
                    continue
                seen[rid] = line
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                kept += 1
    except BaseException:   # a stopped run leaves no half file behind
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, out)
    model.write_text_atomic(out.with_name(out.name + ".dropped"),
                         "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in dropped))
    why = Counter(d["field"].split("[")[0] for d in dropped)
    print(f"convert: kept {kept}/{kept + len(dropped)} records -> {out}"
          + (f"; dropped {len(dropped)} (by field: {', '.join(f'{k} {n}' for k, n in why.most_common())}), listed in "
             f"{out.name}.dropped" if dropped else ""))
    return {"kept": kept, "dropped": dropped}


