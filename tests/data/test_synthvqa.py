import hashlib
import json

import pytest

from ptqbench.data import synthvqa as sv
from ptqbench.errors import BadInput


def _digest(items):
    h = hashlib.sha256()
    for it in items:
        h.update(it.image.tobytes())
        h.update(f"{it.id}|{it.question}|{it.answer}|{it.family}|{it.caption}".encode())
    return h.hexdigest()


def test_same_seed_same_bytes():
    a = sv.generate("eval", 12, seed=5)
    b = sv.generate("eval", 12, seed=5)
    assert _digest(a) == _digest(b)
    assert all(x.image.tobytes() == y.image.tobytes() for x, y in zip(a, b))


def test_prefix_property_and_seed_changes_items():
    assert _digest(sv.generate("calib", 5)) == _digest(sv.generate("calib", 12)[:5])
    assert _digest(sv.generate("calib", 6, seed=1)) != _digest(sv.generate("calib", 6, seed=2))


def test_splits_are_disjoint():
    seen = {}
    for split in sv.SPLITS:
        for it in sv.generate(split, 36):
            key = hashlib.sha256(it.image.tobytes()).hexdigest()
            assert key not in seen, f"{it.id} repeats {seen[key]}"
            seen[key] = it.id
    ids = [v for v in seen.values()]
    assert len(set(ids)) == len(ids)


def test_every_family_present_and_answers_short():
    items = sv.generate("eval", 24)
    assert {it.family for it in items} == set(sv.FAMILIES)
    for it in items:
        assert it.image.size == (sv.SIZE, sv.SIZE) and it.image.mode == "RGB"
        assert it.answer and " " not in it.answer and it.answer == it.answer.lower()
        assert it.question.endswith("?") or it.question.endswith(".")


def test_multi_has_every_family_per_image():
    groups = sv.generate_multi("train", 3)
    for g in groups:
        assert sorted(it.family for it in g) == sorted(sv.FAMILIES)
        assert len({it.image.tobytes() for it in g}) == 1
    assert _digest(sv.generate_multi("train", 2, start=1)[0]) == _digest(groups[1])


def test_multi_extra_questions():
    """`extra` asks some families twice per image; ids stay unique, answers stay consistent."""
    groups = sv.generate_multi("train", 4, extra=("count", "spatial"))
    for g in groups:
        fams = [it.family for it in g]
        assert sorted(fams) == sorted(list(sv.FAMILIES) + ["count", "spatial"])
        assert len({it.id for it in g}) == len(g)
    with pytest.raises(BadInput, match="'size'"):
        sv.generate_multi("train", 1, extra=("size",))


def test_where_is_train_only_and_answers_match_the_scene():
    """The train-only `where` question: the named object's side of the image centre, never the eval split."""
    centre = sv._Obj("", "", sv.SIZE // 2, sv.SIZE // 2, 0)
    answers = set()
    for i in range(40):
        items, scene = sv._multi_one("train", 1, i, 5, sv.GRID, list(sv.FAMILIES), ("where",))
        (it,) = [x for x in items if x.family == "where"]
        color, shape = it.question.split()[3:5]
        (obj,) = [o for o in scene.objects if (o.color, o.shape) == (color, shape)]
        assert sv._relation(obj, centre) == it.answer
        answers.add(it.answer)
    assert answers == set(sv.RELATIONS)
    assert "where" not in sv.FAMILIES
    with pytest.raises(BadInput, match="train split only"):
        sv.generate_multi("eval", 1, extra=("where",))


@pytest.mark.parametrize("split", ["test", "", None, "TRAIN"])
def test_bad_split(split):
    with pytest.raises(BadInput) as e:
        sv.generate(split, 3)
    assert repr(split) in str(e.value) and "eval" in str(e.value)


@pytest.mark.parametrize("n", [0, -1, 2.5, "3", True, None])
def test_bad_n(n):
    with pytest.raises(BadInput, match="n "):
        sv.generate("eval", n)


@pytest.mark.parametrize("seed", [0, -3, 1.0, "1", False])
def test_bad_seed(seed):
    with pytest.raises(BadInput, match="seed"):
        sv.generate("eval", 2, seed=seed)


def test_write_sharegpt4v(tmp_path):
    items = sv.generate("calib", 7)
    out = sv.write_sharegpt4v(items, tmp_path / "qa")
    lines = [json.loads(x) for x in (out / "data.jsonl").read_text().splitlines()]
    assert len(lines) == 7
    rec = lines[0]
    assert rec["id"] == items[0].id and rec["family"] == items[0].family
    assert rec["image"] == f"images/{items[0].id}.png" and (out / rec["image"]).is_file()
    assert rec["conversations"][0] == {"from": "human", "value": "<image>\n" + items[0].question}
    assert rec["conversations"][1] == {"from": "gpt", "value": items[0].answer}
    cap = sv.write_sharegpt4v(items, tmp_path / "cap", mode="caption")
    rec = json.loads((cap / "data.jsonl").read_text().splitlines()[0])
    assert rec["conversations"][1]["value"] == items[0].caption
    with pytest.raises(BadInput, match="mode"):
        sv.write_sharegpt4v(items, tmp_path / "x", mode="bogus")


def test_background_patch_share():
    from PIL import Image

    assert sv.background_patch_share(Image.new("RGB", (224, 224), (10, 20, 30))) == 1.0
    shares = [sv.background_patch_share(it.image) for it in sv.generate("eval", 30)]
    assert all(0.5 < s < 1.0 for s in shares)
    assert sum(shares) / len(shares) > 0.75  # most patches are redundant
