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
        assert not (masks["reply"] & ~masks["valid"]).any() and not (masks["reply"] & masks["vision"]).any()
        assert not (masks["answer"] & ~masks["reply"]).any()
        assert b.hidden.shape[:2] == ids.shape
    assert m["tokens"]["answer"] < m["tokens"]["reply"] < m["tokens"]["text"]


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


def test_reply_mask_is_the_answer_plus_the_generation_prompt(tiny_qwen, tmp_path):
    """`reply` (MBQ's answer set) = the generation prompt's tokens `<|im_start|>assistant\\n` right before
    `answer`, then `answer`; it starts at the last `<|im_start|>` (the reference's labels) and never covers
    padding, in a left-padded batch of samples of different lengths."""
    model, processor = tiny_qwen
    tok = processor.tokenizer
    samples = tiny_samples(processor, n=4)
    path = write_sharegpt(tmp_path, samples)
    cs = C.build_calibration(model, adapter_for(model), processor, str(path), 4, 512, 1, batch_size=4)
    assert len(cs.batches) == 1
    b = cs.batches[0]
    valid, answer, reply = b.masks["valid"], b.masks["answer"], b.masks["reply"]
    lengths = valid.sum(1)
    assert len(set(lengths.tolist())) > 1 and (~valid).any(), "the batch should mix lengths and pad"
    assert all(bool(valid[i, -1]) for i in range(4)), "left padding"
    start_id = tok.convert_tokens_to_ids("<|im_start|>")
    T = b.input_ids.shape[1]
    for i in range(4):
        ids = b.input_ids[i]
        assert not (reply[i] & ~valid[i]).any()
        assert not (answer[i] & ~reply[i]).any()
        header = reply[i] & ~answer[i]
        pos = header.nonzero().flatten()
        a0 = int(answer[i].nonzero().flatten()[0])
        # the header is contiguous and ends right before the answer; reply runs to the end of the row
        assert pos.tolist() == list(range(a0 - len(pos), a0)) and bool(reply[i, a0:].all())
        assert tok.decode(ids[header]) == "<|im_start|>assistant\n"
        # the reference: labels = -100 up to the last <|im_start|> of the (unpadded) sequence
        last_start = int((ids == start_id).nonzero().flatten()[-1])
        ref = torch.zeros(T, dtype=torch.bool)
        ref[last_start:] = True
        assert torch.equal(reply[i], ref & valid[i])
        assert any(tok.decode(ids[answer[i]]).startswith(s.answer) for s in samples)


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


def test_cache_entry_without_reply_mask_is_recaptured(tiny_qwen, tmp_path):
    """An entry saved before the `reply` mask existed is not used: the set is recaptured and rewritten."""
    model, processor = tiny_qwen
    path = write_sharegpt(tmp_path, tiny_samples(processor, n=3))
    a = C.build_calibration(model, adapter_for(model), processor, str(path), 3, 512, 1, cache_dir=tmp_path / "cache")
    (f,) = (tmp_path / "cache").glob("calib-*.pt")
    data = torch.load(f, weights_only=False)
    for b in data["batches"]:
        del b["masks"]["reply"]
    torch.save(data, f)
    b = C.build_calibration(model, adapter_for(model), processor, str(path), 3, 512, 1, cache_dir=tmp_path / "cache")
    assert all("reply" in cb.masks for cb in b.batches) and b.hash == a.hash
    assert all("reply" in cb["masks"] for cb in torch.load(f, weights_only=False)["batches"])


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
    assert t["vision"] == 0 and t["answer"] == t["reply"] == t["valid"] > 0
    assert all(torch.equal(b.masks["reply"], b.masks["valid"]) for b in cs.batches)


def test_manifest_reports_token_shares_and_background(tiny_qwen):
    """The manifest says how many tokens are vision vs text and how redundant the images are."""
    model, processor = tiny_qwen
    cs = C.build_calibration(model, adapter_for(model), processor, "synthvqa", 3, 512, 1, batch_size=3)
    t = cs.manifest["tokens"]
    assert t["vision"] + t["text"] == t["valid"] and t["vision"] > 0 and 0 < t["answer"] < t["reply"] < t["text"]
    assert 0.6 < cs.manifest["background_patch_share"] < 1.0  # synthvqa scenes are mostly plain background


def test_vision_tower_batches_have_every_mask(tiny_qwen, tmp_path):
    """The vision-tower captures carry the same mask keys: every token vision, none text/answer/reply."""
    model, processor = tiny_qwen
    path = write_sharegpt(tmp_path, tiny_samples(processor, n=2))
    cs = C.build_calibration(model, adapter_for(model), processor, str(path), 2, 512, 1, vision=True)
    assert cs.vision_batches
    for b in cs.vision_batches:
        assert set(b.masks) == set(C.MASK_KEYS)
        assert b.masks["vision"].all() and not (b.masks["answer"] | b.masks["reply"] | b.masks["text"]).any()
