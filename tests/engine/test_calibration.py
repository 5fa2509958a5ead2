"""Calibration capture: masks from token ids and the chat template, padding excluded, content hash, cache."""

import json

import pytest
import torch

from ptqbench.errors import BadInput
from ptqbench.engine import calib_cache as CC
from ptqbench.engine import calibration as C
from ptqbench.models.adapters import adapter_for

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
    files = list((tmp_path / "cache").iterdir())
    assert [f.name for f in files] == [f"calib-{a.manifest['cache_key']}.safetensors"]  # one file, no leftovers
    b = C.build_calibration(model, adapter_for(model), processor, str(path), 3, 512, 1, cache_dir=tmp_path / "cache")
    assert b.hash == a.hash and C.content_hash(b.batches) == a.hash


def test_cache_entry_without_reply_mask_is_recaptured(tiny_qwen, tmp_path):
    """An entry lacking a mask (e.g. saved before `reply` existed) is not used: the set is recaptured and
    rewritten, with one warning."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    model, processor = tiny_qwen
    path = write_sharegpt(tmp_path, tiny_samples(processor, n=3))
    a = C.build_calibration(model, adapter_for(model), processor, str(path), 3, 512, 1, cache_dir=tmp_path / "cache")
    (f,) = (tmp_path / "cache").glob("calib-*.safetensors")
    with safe_open(str(f), "pt") as h:
        meta = h.metadata()
    tensors = load_file(f)
    skeleton = json.loads(meta["skeleton"])
    for b in skeleton["batches"]:
        masks = b["masks"]["d"]
        (reply,) = [m for m in masks if m[0] == "reply"]
        masks.remove(reply)
        del tensors[reply[1]["t"]]
    save_file(tensors, str(f), metadata=dict(meta, skeleton=json.dumps(skeleton)))
    warnings = []
    b = C.build_calibration(model, adapter_for(model), processor, str(path), 3, 512, 1, cache_dir=tmp_path / "cache",
                            warn=warnings.append)
    assert all("reply" in cb.masks for cb in b.batches) and b.hash == a.hash
    assert len(warnings) == 1 and "reply" in warnings[0], warnings
    assert all("reply" in cb.masks for cb in CC.read_calibration_cache(f).batches)


def test_long_samples_dropped_not_truncated(tiny_qwen, tmp_path):
    model, processor = tiny_qwen
    path = write_sharegpt(tmp_path, tiny_samples(processor, n=3))
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


# ---- bad sources: one BadInput line naming the bad value, never a traceback --------------------------
CONV = [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]

BAD_SOURCES = [
    # (id, file name, content (bytes, str, or a JSON-able list), text the message must contain)
    ("txt-not-utf8", "c.txt", b"\xff\xfe\x00\x81binary", ["c.txt", "0xff", "UTF-8"]),
    ("txt-nul-bytes", "c.txt", b"one line\x00\x01\x02\n", ["c.txt", "NUL"]),
    ("json-not-a-list", "c.json", {"conversations": CONV}, ["c.json", "dict"]),
    ("jsonl-bad-line", "c.jsonl", '{"conversations": []}\n{not json\n', ["c.jsonl", "line 2"]),
    ("record-not-object", "c.json", ["just text"], ["c.json", "'just text'", "record [0]"]),
    ("conversations-not-list", "c.json", [{"id": "a", "conversations": "hi there"}], ["'hi there'", "conversations"]),
    ("conversations-missing", "c.json", [{"id": "a"}], ["conversations None"]),
    ("entries-not-objects", "c.json", [{"id": "a", "conversations": ["hi", "there"]}], ["c.json", "'hi'"]),
    ("value-not-string", "c.json", [{"conversations": [{"from": "human", "value": ["q"]}, CONV[1]]}], ["value ['q']"]),
    ("no-gpt-turn", "c.json", [{"id": "x7", "conversations": CONV[:1]}], ["'x7'", "gpt"]),
    ("image-not-string", "c.json", [{"image": 7, "conversations": CONV}], ["image 7"]),
    ("image-is-object", "c.json", [{"image": {"path": "a.png"}, "conversations": CONV}], ["image {'path': 'a.png'}"]),
    ("image-missing", "c.json", [{"image": "gone.png", "conversations": CONV}], ["'gone.png'", "does not exist"]),
    ("image-undecodable", "c.json", [{"image": "bad.png", "conversations": CONV}], ["bad.png", "cannot be decoded"]),
    ("jsonl-names-the-line", "c.jsonl", "\n" + json.dumps({"image": 3, "conversations": CONV}) + "\n", ["line 2", "image 3"]),
]


@pytest.mark.parametrize("case, name, content, needles", BAD_SOURCES, ids=[c[0] for c in BAD_SOURCES])
def test_bad_source_is_one_bad_input_line(case, name, content, needles, tmp_path):
    if isinstance(content, (list, dict)):
        content = json.dumps(content) if name.endswith(".json") else "\n".join(map(json.dumps, content))
    p = tmp_path / name
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    (tmp_path / "bad.png").write_bytes(b"not a png")
    for check in (C.check_source, C.load_samples):  # the runner's early check and the capture's own load
        with pytest.raises(BadInput) as e:
            check(str(p), 4, 1, None)
        msg = str(e.value)
        assert "\n" not in msg and "accepted" in msg, msg
        assert all(n in msg for n in needles), msg


def test_unreadable_calibration_file_is_bad_input(tmp_path, monkeypatch):
    p = tmp_path / "c.txt"
    p.write_text("a sample\n")

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(type(p), "read_bytes", denied)  # running as root, chmod 000 would not stop a read
    with pytest.raises(BadInput, match="c.txt.*Permission denied"):
        C.check_source(str(p), 2, 1, None)


def test_directory_and_missing_sources_are_bad_input(tmp_path):
    (tmp_path / "d.json").mkdir()
    for source in (str(tmp_path / "d.json"), str(tmp_path / "missing.json"), ""):
        with pytest.raises(BadInput, match="is not"):
            C.check_source(source, 2, 1, None)


def test_image_root_must_be_a_folder(tiny_qwen, tmp_path):
    path = write_sharegpt(tmp_path, tiny_samples(tiny_qwen[1], n=2))
    with pytest.raises(BadInput, match="nowhere"):
        C.check_source(str(path), 2, 1, str(tmp_path / "nowhere"))
    assert C.check_source(str(path), 2, 1, str(tmp_path)) is None  # the images' own folder


def test_only_selected_records_are_read_and_a_file_named_synthvqa_is_a_file(tiny_qwen, tmp_path, monkeypatch):
    """Every selected record is validated (and its image decoded) at load time; a path that merely starts
    with `synthvqa` is a file, not the built-in set."""
    samples = tiny_samples(tiny_qwen[1], n=3)
    path = write_sharegpt(tmp_path, samples)
    named = tmp_path / "synthvqa.jsonl"
    path.rename(named)
    monkeypatch.chdir(tmp_path)
    got, desc = C.load_samples("synthvqa.jsonl", 3, 1)
    assert desc["source"] == "synthvqa.jsonl" and len(got) == 3 and all(s.image is not None for s in got)
    assert {s.answer for s in got} == {s.answer for s in samples}
    (tmp_path / "images" / "1.png").write_bytes(b"damaged")
    with pytest.raises(BadInput, match="1.png"):
        C.load_samples("synthvqa.jsonl", 3, 1)


def test_record_order_is_the_seeded_shuffle(tmp_path):
    """Records are picked in the order MBQ's seeded shuffle of the list gives."""
    import random

    recs = [{"id": str(i), "conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]}
            for i in range(10)]
    p = tmp_path / "c.json"
    p.write_text(json.dumps(recs))
    expected = list(recs)
    random.Random(3).shuffle(expected)
    got, _ = C.load_samples(str(p), 4, 3)
    assert [s.answer for s in got] == [r["conversations"][1]["value"] for r in expected[:4]]


def test_a_models_fingerprint_is_its_content_not_its_folder(tmp_path, tiny_qwen):
    """A moved or freshly cloned checkout keeps its cells: the folder a small model was loaded from is not
    part of its identity; its weights are."""
    from transformers import AutoModelForImageTextToText

    model, _ = tiny_qwen
    model.save_pretrained(tmp_path / "a")
    model.save_pretrained(tmp_path / "b")
    a = AutoModelForImageTextToText.from_pretrained(tmp_path / "a", dtype=torch.float32)
    b = AutoModelForImageTextToText.from_pretrained(tmp_path / "b", dtype=torch.float32)
    assert a.config._name_or_path != b.config._name_or_path
    assert C.model_fingerprint(a) == C.model_fingerprint(b)
    with torch.no_grad():
        next(b.parameters()).add_(1e-3)
    assert C.model_fingerprint(a) != C.model_fingerprint(b)
