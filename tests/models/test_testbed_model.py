import os
import shutil

import pytest
import torch

from ptqbench.models import testbed as tb
from ptqbench.errors import BadInput

os.environ.setdefault("HF_HUB_OFFLINE", "1")

HAVE_CKPT = (tb.TESTBED_DIR / "model.safetensors").is_file()
needs_ckpt = pytest.mark.skipif(not HAVE_CKPT, reason="testbed checkpoint not built yet (testbed/train.py)")


@pytest.fixture(scope="module")
def tokenizer():
    return tb.build_tokenizer()


def test_tokenizer_specials_and_template(tokenizer):
    for t in tb.SPECIAL_TOKENS:
        i = tokenizer.convert_tokens_to_ids(t)
        assert isinstance(i, int) and tokenizer.convert_ids_to_tokens(i) == t
    text = tokenizer.apply_chat_template(
        [{"role": "system", "content": "you are a helpful assistant."},
         {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is the star?"}]}],
        add_generation_prompt=True, tokenize=False)
    assert text == ("<|im_start|>system\nyou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>what color is the star?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    ids = tokenizer("what color is the star?")["input_ids"]
    assert tokenizer.decode(ids) == "what color is the star?"


def test_config_and_processor_give_64_vision_tokens(tokenizer):
    from ptqbench.data import synthvqa as sv

    cfg = tb.testbed_config(tokenizer)
    assert cfg.text_config.hidden_size >= 256 and cfg.text_config.num_hidden_layers >= 4
    assert cfg.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert cfg.vision_config.hidden_size == cfg.text_config.hidden_size
    assert cfg.text_config.vocab_size >= len(tokenizer)
    proc = tb.build_processor(tokenizer)
    item = sv.generate("calib", 1)[0]
    enc = proc(text=["<|vision_start|><|image_pad|><|vision_end|>hi"], images=[item.image], return_tensors="pt")
    assert (enc["input_ids"] == cfg.image_token_id).sum().item() == 64
    assert enc["image_grid_thw"].tolist() == [[1, 16, 16]]
    # a deeper variant for retraining experiments; the shipped checkpoint has 4 layers
    assert cfg.text_config.num_hidden_layers == 4
    assert tb.testbed_config(tokenizer, layers=8).text_config.num_hidden_layers == 8


def test_sha256_helpers(tmp_path):
    (tmp_path / "a.json").write_text("{}")
    (tmp_path / "b.bin").write_bytes(b"\x00\x01")
    tb.write_sha256sums(tmp_path)
    tb.verify_sha256sums(tmp_path)
    (tmp_path / "c.txt").write_text("extra")
    with pytest.raises(BadInput, match="c.txt"):
        tb.verify_sha256sums(tmp_path)
    (tmp_path / "c.txt").unlink()
    (tmp_path / "b.bin").unlink()
    with pytest.raises(BadInput, match="b.bin"):
        tb.verify_sha256sums(tmp_path)
    (tmp_path / "SHA256SUMS").unlink()
    with pytest.raises(BadInput, match="SHA256SUMS"):
        tb.verify_sha256sums(tmp_path)


def test_missing_dir_is_badinput(tmp_path):
    with pytest.raises(BadInput, match="nope"):
        tb.load_testbed(tmp_path / "nope")


@needs_ckpt
def test_shipped_checkpoint_size_and_sums():
    tb.verify_sha256sums(tb.TESTBED_DIR)
    size = sum(p.stat().st_size for p in tb.TESTBED_DIR.iterdir() if p.is_file())
    assert size <= 25e6
    names = {p.name for p in tb.TESTBED_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "MODEL_CARD.md", "SHA256SUMS"} <= names


@needs_ckpt
@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json"])
def test_flipped_byte_is_caught(tmp_path, name):
    d = tmp_path / "tb"
    shutil.copytree(tb.TESTBED_DIR, d)
    p = d / name
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))
    with pytest.raises(BadInput, match=name.replace(".", r"\.")):
        tb.load_testbed(d)


@needs_ckpt
def test_missing_file_is_caught(tmp_path):
    d = tmp_path / "tb"
    shutil.copytree(tb.TESTBED_DIR, d)
    (d / "tokenizer_config.json").unlink()
    with pytest.raises(BadInput, match="tokenizer_config"):
        tb.load_testbed(d)


@needs_ckpt
def test_loads_offline_with_auto_classes(monkeypatch):
    from transformers import AutoModelForImageTextToText, AutoProcessor, Qwen2VLForConditionalGeneration

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = AutoModelForImageTextToText.from_pretrained(str(tb.TESTBED_DIR))
    proc = AutoProcessor.from_pretrained(str(tb.TESTBED_DIR))
    assert isinstance(model, Qwen2VLForConditionalGeneration)
    assert type(proc).__name__ == "Qwen2VLProcessor"
    m2, p2 = tb.load_testbed()
    assert next(m2.parameters()).dtype == torch.float32 and not m2.training
    n = sum(p.numel() for p in m2.parameters())
    assert 1e6 < n < 13e6
