"""Calibration capture: masks from token ids and the chat template, padding excluded, content hash, cache."""

import torch

from ptqbench.harness import calibration as C
from ptqbench.harness.adapters import adapter_for

from _helpers import tiny_samples, write_sharegpt


def test_masks_and_manifest(tiny_qwen, tiny_calib):
    model, processor = tiny_qwen
    image_id = adapter_for(model).image_token_id()
    m = tiny_calib.manifest
    assert m["n_samples"] == 8 and m["tokens"]["vision"] > 0 and m["tokens"]["answer"] > 0
    assert m["tokens"]["vision"] + m["tokens"]["text"] == m["tokens"]["valid"]
    for b in tiny_calib.batches:
        ids, masks = b.input_ids, b.masks
        assert torch.equal(masks["vision"], (ids == image_id) & masks["valid"])
        assert not (masks["answer"] & masks["vision"]).any()
        assert not (masks["answer"] & ~masks["valid"]).any()
        assert b.hidden.shape[:2] == ids.shape


def test_answer_mask_decodes_to_the_answer(tiny_qwen, tmp_path):
    model, processor = tiny_qwen
    samples = tiny_samples(processor, n=2)
    path = write_sharegpt(tmp_path, samples)
    cs = C.build_calibration(model, adapter_for(model), processor, str(path), 2, 512, 1, batch_size=2)
    tok = processor.tokenizer
    b = cs.batches[0]
    # records are shuffled with the seed; every decoded answer span must be one of the answers
    answers = {s.answer for s in samples}
    for i in range(2):
        text = tok.decode(b.input_ids[i][b.masks["answer"][i]])
        assert any(text.startswith(a) for a in answers), text


def test_padding_is_masked_and_hash_is_stable(tiny_qwen, tmp_path):
    model, processor = tiny_qwen
    path = write_sharegpt(tmp_path, tiny_samples(processor, n=4))
    a = C.build_calibration(model, adapter_for(model), processor, str(path), 4, 512, 1, batch_size=4)
    b = C.build_calibration(model, adapter_for(model), processor, str(path), 4, 512, 1, batch_size=4)
    assert a.hash == b.hash
    valid = a.batches[0].masks["valid"]
    assert (~valid).any(), "samples of different lengths should pad"
    c = C.build_calibration(model, adapter_for(model), processor, str(path), 3, 512, 1, batch_size=4)
    assert c.hash != a.hash


def test_cache_roundtrip(tiny_qwen, tmp_path):
    model, processor = tiny_qwen
    path = write_sharegpt(tmp_path, tiny_samples(processor, n=3))
    a = C.build_calibration(model, adapter_for(model), processor, str(path), 3, 512, 1, cache_dir=tmp_path / "cache")
    files = list((tmp_path / "cache").glob("calib-*.pt"))
    assert len(files) == 1
    b = C.build_calibration(model, adapter_for(model), processor, str(path), 3, 512, 1, cache_dir=tmp_path / "cache")
    assert b.hash == a.hash and C.content_hash(b.batches) == a.hash


def test_long_samples_dropped_not_truncated(tiny_qwen, tmp_path):
    model, processor = tiny_qwen
    path = write_sharegpt(tmp_path, tiny_samples(processor, n=3))
    import pytest
    from ptqbench.errors import BadInput

    with pytest.raises(BadInput, match="no calibration sample fits"):
        C.build_calibration(model, adapter_for(model), processor, str(path), 3, 10, 1)


def test_text_only_source(tiny_qwen, tmp_path):
    model, processor = tiny_qwen
    path = tmp_path / "text.txt"
    path.write_text("the quick brown fox\n\njumps over the lazy dog again and again\n")
    cs = C.build_calibration(model, adapter_for(model), processor, str(path), 2, 512, 1)
    t = cs.manifest["tokens"]
    assert t["vision"] == 0 and t["answer"] == t["valid"] > 0


def test_manifest_reports_token_shares_and_background(tiny_qwen):
    """The manifest says how many tokens are vision vs text and how redundant the images are."""
    model, processor = tiny_qwen
    cs = C.build_calibration(model, adapter_for(model), processor, "synthvqa", 3, 512, 1, batch_size=3)
    t = cs.manifest["tokens"]
    assert t["vision"] + t["text"] == t["valid"] and t["vision"] > 0 and 0 < t["answer"] < t["text"]
    assert 0.6 < cs.manifest["background_patch_share"] < 1.0  # synthvqa scenes are mostly plain background
