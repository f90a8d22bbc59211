"""
Qwen2.5-VL's text side for GAP: the tokenizer (tokenizer.json, read with `tokenizers`) with the three latent tokens,
the ChatML template as the processor's chat_template.json renders it, prompt and response token ids with their
labels, and the tokenizer / template / processor files a hub folder carries besides the weights. prepare.py
re-exports every name (prepare.load_tokenizer, prepare.prompt_ids, ...).

    .venv/bin/python -m pytest -q tests/test_prepare.py tests/test_hub.py   # against Qwen2_5_VLProcessor
"""
import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer

import model
from model import data_error

# ---- tokenizer and chat template (Qwen2.5-VL's ChatML, as its processor's chat_template.json renders it) ----

# Qwen's 22 special tokens in id order (151643..151664); the synthetic tokenizer puts them at 643..664.
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>")
LATENT_TOKENS = ("<|latent_start|>", "<|latent_pad|>", "<|latent_end|>")
LATENT_PLACEHOLDER = "<latent>"   # in the data's `response`; one per auxiliary image
SYSTEM_PROMPT = "You are a helpful assistant."
IGNORE = -100                     # label of a position that is not supervised (torch cross_entropy ignore_index)
_NAMES = {"endoftext": "<|endoftext|>", "im_start": "<|im_start|>", "im_end": "<|im_end|>",
          "vision_start": "<|vision_start|>", "vision_end": "<|vision_end|>", "image_pad": "<|image_pad|>",
          "latent_start": LATENT_TOKENS[0], "latent_pad": LATENT_TOKENS[1], "latent_end": LATENT_TOKENS[2]}


def load_tokenizer(path_or_dir):
    """tokenizer.json (or a folder holding one) with the three latent tokens added as specials if missing.
    tokenizers gives added tokens the next free ids: 151665..151667 for Qwen, 665..667 for the synthetic one."""
    path = Path(path_or_dir)
    path = path / "tokenizer.json" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no tokenizer.json")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:   # tokenizers raises a bare Exception for a truncated or foreign file
        raise data_error(path, "file", f"expected a tokenizers JSON file, found an unreadable one ({e})") from None
    missing = [t for t in LATENT_TOKENS if tok.token_to_id(t) is None]
    # normalized=False: match the literal string; no lstrip/rstrip, so neighbouring spaces stay ordinary text
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
    return tok


def check_latent_ids(tok, cfg):
    """The latent tokens must index existing embedding rows: Qwen has 152064 rows for 151665 tokens, so they fit
    without resizing; a checkpoint without spare rows would index out of range deep inside the embedding."""
    ids = {t: tok.token_to_id(t) for t in LATENT_TOKENS}
    bad = {t: i for t, i in ids.items() if i is None or i >= cfg.text.vocab_size}
    if bad:
        raise ValueError(f"latent token ids {bad} do not fit the model's {cfg.text.vocab_size} embedding rows "
                         f"(config vocab_size); the tokenizer has {tok.get_vocab_size()} entries")
    return ids


# Qwen2-VL / Qwen2.5-VL's chat template as the hub ships it (chat_template.json, also in tokenizer_config.json).
# prompt_ids/build_example below produce exactly its rendering, token for token (tests/test_hub.py checks it with
# transformers' Qwen2_5_VLProcessor and the real Qwen tokenizer); the exported folder carries it for other tools.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}")


def token_ids(tok):
    """Ids of the template's special tokens (a missing one is an error: the template would silently break)."""
    ids = {name: tok.token_to_id(t) for name, t in _NAMES.items()}
    missing = [_NAMES[n] for n, i in ids.items() if i is None]
    if missing:
        raise ValueError(f"tokenizer lacks the special token(s) {missing}")
    return ids


def _text_ids(tok, text):
    return tok.encode(text, add_special_tokens=False).ids


def prompt_ids(tok, question, n_image_tokens):
    """system + user(image, question) + "<|im_start|>assistant\\n", with n_image_tokens <|image_pad|>.
    Built piece by piece between special tokens: identical to encoding the whole string (added tokens split the
    text the same way), but it never depends on the BPE spotting specials inside text."""
    i = token_ids(tok)
    return ([i["im_start"]] + _text_ids(tok, "system\n" + SYSTEM_PROMPT) + [i["im_end"]] + _text_ids(tok, "\n")
            + [i["im_start"]] + _text_ids(tok, "user\n")
            + [i["vision_start"]] + [i["image_pad"]] * n_image_tokens + [i["vision_end"]]
            + _text_ids(tok, question) + [i["im_end"]] + _text_ids(tok, "\n")
            + [i["im_start"]] + _text_ids(tok, "assistant\n"))


def serialize_response(response, n_latents):
    """Each "<latent>" -> <|latent_start|> + N x <|latent_pad|> + <|latent_end|> (the text form of the ids)."""
    span = LATENT_TOKENS[0] + LATENT_TOKENS[1] * n_latents + LATENT_TOKENS[2]
    return response.replace(LATENT_PLACEHOLDER, span)


def build_example(tok, question, response, n_image_tokens, n_latents):
    """-> (input_ids, labels), same length, NOT shifted (train.py shifts). Labels are IGNORE on the prompt, the
    image pads and the latent pads; the response text is supervised, with <|latent_start|> (the model must learn
    when to think in latents), <|latent_end|> and <|im_end|> (the stop token). The turn ends "<|im_end|>\\n" like
    the chat template, but that "\\n" is masked: generation stops at <|im_end|>, so the "\\n" is never sampled."""
    i = token_ids(tok)
    prompt = prompt_ids(tok, question, n_image_tokens)
    pieces = response.split(LATENT_PLACEHOLDER)
    resp = _text_ids(tok, pieces[0])
    for piece in pieces[1:]:
        resp += [i["latent_start"]] + [i["latent_pad"]] * n_latents + [i["latent_end"]] + _text_ids(tok, piece)
    tail = _text_ids(tok, "\n")
    input_ids = prompt + resp + [i["im_end"]] + tail
    # a latent pad is never a token target: what the model emits there is v, which the latent loss trains
    labels = ([IGNORE] * len(prompt) + [IGNORE if t == i["latent_pad"] else t for t in resp] + [i["im_end"]]
              + [IGNORE] * len(tail))
    return input_ids, labels


# ---- the files a hub Qwen2.5-VL folder has besides config.json and the weights ----


def write_hub_files(out, tok, cfg, pixels, base=None):
    """tokenizer.json (with the latent tokens), tokenizer_config.json (every added token in added_tokens_decoder, the
    chat template), chat_template.json, preprocessor_config.json (the pixel limits the model was trained at) and
    generation_config.json (the base folder's if it has one, else greedy with Qwen's stop ids), so that transformers'
    AutoProcessor / AutoTokenizer and Qwen2_5_VLForConditionalGeneration (and vLLM) load `out` as a Qwen2.5-VL."""
    out, ids = Path(out), token_ids(tok)
    tok.save(str(out / "tokenizer.json"))
    added = {str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                      "single_word": t.single_word, "special": t.special}
             for i, t in sorted(tok.get_added_tokens_decoder().items())}
    tok_cfg = {"add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": added,
               "additional_special_tokens": [t["content"] for t in added.values() if t["special"]],
               "bos_token": None, "chat_template": CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
               "eos_token": _NAMES["im_end"], "errors": "replace", "model_max_length": cfg.text.max_position_embeddings,
               "pad_token": _NAMES["endoftext"], "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer",
               "unk_token": None, "processor_class": "Qwen2_5_VLProcessor"}
    v, (lo, hi) = cfg.vision, pixels[:2]
    pre = {"image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
           # both spellings of the limits: min_pixels / max_pixels (older transformers) and size (newer ones)
           "min_pixels": lo, "max_pixels": hi, "size": {"shortest_edge": lo, "longest_edge": hi},
           "patch_size": v.patch_size, "temporal_patch_size": v.temporal_patch_size, "merge_size": v.spatial_merge_size,
           # resample 3 is PIL.Image.BICUBIC, the filter preprocess_image resizes with
           "image_mean": list(model.IMAGE_MEAN), "image_std": list(model.IMAGE_STD), "resample": 3,
           "rescale_factor": 1 / 255, "do_resize": True, "do_rescale": True, "do_normalize": True,
           "do_convert_rgb": True}
    files = {"tokenizer_config.json": tok_cfg, "chat_template.json": {"chat_template": CHAT_TEMPLATE},
             "preprocessor_config.json": pre}
    gen = Path(base) / "generation_config.json" if base else None
    if gen is None or not gen.is_file():
        # either eos id stops generation: <|im_end|> closes a chat turn, <|endoftext|> a plain completion
        files["generation_config.json"] = {"bos_token_id": cfg.bos_token_id, "pad_token_id": ids["endoftext"],
                                           "eos_token_id": [ids["im_end"], ids["endoftext"]], "do_sample": False}
    for name, d in files.items():
        model.write_text_atomic(out / name, json.dumps(d, indent=2, ensure_ascii=False) + "\n")
    if "generation_config.json" not in files:
        model.write_text_atomic(out / "generation_config.json", gen.read_text())
