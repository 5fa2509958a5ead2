"""SynthVQA: a procedural visual-question-answering benchmark.

Every image is a 224x224 canvas with a large plain (or lightly noise-textured) background, a few
coloured shapes and one rendered label (a digit or a short word, drawn with a built-in bitmap font
so rendering never depends on the fonts of the machine). Objects and the label sit in the cells of
an 8x8 grid of 28 px cells -- the area of one merged Qwen2-VL vision token -- so most 14x14 patches
(about 90%) are pure background and the few that carry objects or text carry the answer. That is the
regime in which vision-token pruning and activation-outlier behaviour of VLMs matter, at a size a CPU can evaluate.

Question families (reported separately): ``color``, ``shape``, ``count``, ``spatial``, ``exists``,
``text``. Answers are single lowercase words or digits.

Determinism: item ``i`` of split ``s`` with seed ``k`` is drawn from
``numpy.random.default_rng([SPLIT_CODE[s], k, i])`` only, so it never depends on ``n`` (a smaller
``n`` gives a prefix) nor on the machine, and the three splits use disjoint seed spaces.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ptqbench.errors import BadInput, one_of

FAMILIES: tuple[str, ...] = ("color", "shape", "count", "spatial", "exists", "text")
SPLITS: tuple[str, ...] = ("train", "calib", "eval")
# Distinct first words of the seed-sequence entropy: the splits can never share a random stream.
SPLIT_CODE = {"train": 0x5EED_0001, "calib": 0x5EED_0002, "eval": 0x5EED_0003}
DEFAULT_SEED = {"train": 1, "calib": 1, "eval": 1}
# Appended to every question put to a model (LLaVA's short-answer instruction) so that real VLMs answer
# in one word, as SynthVQA's answers are. The tasks prompt with it and the testbed's tokenizer learns it.
INSTRUCTION = "\nAnswer the question using a single word or phrase."

SIZE = 224  # canvas side; 16x16 patches of 14 px -> 64 vision tokens after Qwen2-VL's 2x2 merge
PATCH = 14
CELL = 28  # one merged vision token
GRID = SIZE // CELL

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (214, 39, 40),
    "green": (34, 160, 60),
    "blue": (31, 80, 220),
    "yellow": (240, 200, 20),
    "purple": (140, 60, 190),
    "orange": (250, 125, 15),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (248, 248, 246),
    "gray": (222, 222, 222),
    "beige": (240, 230, 205),
    "pale": (214, 230, 238),
}
TEXT_COLOR = (25, 25, 25)
WORDS: tuple[str, ...] = ("cat", "dog", "sun", "box", "map", "cup", "hat", "key")
DIGITS: tuple[str, ...] = tuple("0123456789")
RELATIONS: tuple[str, ...] = ("left", "right", "above", "below")
# Training-only question families (never in the eval split): ``where`` asks where one object sits
# relative to the image centre ("in the image"), the single lookup a ``spatial`` question makes twice.
TRAIN_FAMILIES: tuple[str, ...] = ("where",)
MAX_COUNT = 3  # count answers are 1..MAX_COUNT

# 5x7 bitmap glyphs: deterministic text rendering on every platform.
_GLYPHS = {
    "0": ["01110", "10001", "10011", "10101", "11001", "10001", "01110"],
    "1": ["00100", "01100", "00100", "00100", "00100", "00100", "01110"],
    "2": ["01110", "10001", "00001", "00010", "00100", "01000", "11111"],
    "3": ["11111", "00010", "00100", "00010", "00001", "10001", "01110"],
    "4": ["00010", "00110", "01010", "10010", "11111", "00010", "00010"],
    "5": ["11111", "10000", "11110", "00001", "00001", "10001", "01110"],
    "6": ["00110", "01000", "10000", "11110", "10001", "10001", "01110"],
    "7": ["11111", "00001", "00010", "00100", "01000", "01000", "01000"],
    "8": ["01110", "10001", "10001", "01110", "10001", "10001", "01110"],
    "9": ["01110", "10001", "10001", "01111", "00001", "00010", "01100"],
    "A": ["01110", "10001", "10001", "11111", "10001", "10001", "10001"],
    "B": ["11110", "10001", "10001", "11110", "10001", "10001", "11110"],
    "C": ["01110", "10001", "10000", "10000", "10000", "10001", "01110"],
    "D": ["11110", "10001", "10001", "10001", "10001", "10001", "11110"],
    "E": ["11111", "10000", "10000", "11110", "10000", "10000", "11111"],
    "G": ["01110", "10001", "10000", "10111", "10001", "10001", "01111"],
    "H": ["10001", "10001", "10001", "11111", "10001", "10001", "10001"],
    "K": ["10001", "10010", "10100", "11000", "10100", "10010", "10001"],
    "M": ["10001", "11011", "10101", "10101", "10001", "10001", "10001"],
    "N": ["10001", "10001", "11001", "10101", "10011", "10001", "10001"],
    "O": ["01110", "10001", "10001", "10001", "10001", "10001", "01110"],
    "P": ["11110", "10001", "10001", "11110", "10000", "10000", "10000"],
    "S": ["01111", "10000", "10000", "01110", "00001", "00001", "11110"],
    "T": ["11111", "00100", "00100", "00100", "00100", "00100", "00100"],
    "U": ["10001", "10001", "10001", "10001", "10001", "10001", "01110"],
    "X": ["10001", "10001", "01010", "00100", "01010", "10001", "10001"],
    "Y": ["10001", "10001", "01010", "00100", "00100", "00100", "00100"],
}

_Q = {
    "color": ("what color is the {shape}?", "which color does the {shape} have?"),
    "shape": ("what shape is the {color} object?", "which shape is {color}?"),
    "count": ("how many {shape}s are there?", "count the {shape}s."),
    "spatial": ("where is the {c1} {s1} relative to the {c2} {s2}?",),
    "where": ("where is the {c1} {s1} in the image?",),
    "exists": ("is there a {color} {shape}?", "does the image contain a {color} {shape}?"),
    "text": ("what is written in the image?", "what does the text say?"),
}


@dataclass
class Item:
    id: str
    image: Image.Image
    question: str
    answer: str
    family: str
    caption: str


@dataclass
class _Obj:
    shape: str
    color: str
    cx: int
    cy: int
    r: int  # half side / radius in pixels

    @property
    def box(self):
        return (self.cx - self.r, self.cy - self.r, self.cx + self.r, self.cy + self.r)


@dataclass
class _Scene:
    background: str
    textured: bool
    objects: list[_Obj]
    label: str
    label_box: tuple[int, int, int, int]
    label_scale: int
    size: int = SIZE
    label_cell: tuple[int, int] = (0, 0)  # (row, col) of the label's first grid cell


# ----------------------------------------------------------------------------- validation


def _check_split(split) -> str:
    if split not in SPLITS:
        raise one_of("split", split, SPLITS)
    return split


def _check_pos_int(what: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise BadInput(f"{what} {value!r} is not accepted; accepted: a positive integer")
    return int(value)


# ----------------------------------------------------------------------------- scenes


def _label_size(label: str, scale: int) -> tuple[int, int]:
    n = len(label)
    return n * 5 * scale + (n - 1) * scale, 7 * scale


def _sample_scene(rng: np.random.Generator, max_objects: int = 5, grid: int = GRID) -> _Scene:
    """Draw a scene: unique (colour, shape) pairs, one text label, each in its own grid cell.

    The canvas is an 8x8 grid of 28 px cells, the area of one merged Qwen2-VL vision token (2x2
    patches of 14 px). Every object sits inside one cell (with a little jitter) and the label in one
    (digit) or two (word) cells, so every other token of the image is pure background.
    """
    while True:
        background = str(rng.choice(list(BACKGROUNDS)))
        textured = bool(rng.random() < 0.5)
        if rng.random() < 0.5:
            label = str(rng.choice(DIGITS))
            scale, span = 3, 1  # 15x21 px glyph in one cell
        else:
            label = str(rng.choice(WORDS))
            scale, span = 3, 2  # 51x21 px word over two cells
        lw, lh = _label_size(label, scale)
        free = [(r, c) for r in range(grid) for c in range(grid)]
        lr = int(rng.integers(grid))
        lc = int(rng.integers(grid - span + 1))
        for k in range(span):
            free.remove((lr, lc + k))
        lx = lc * CELL + (span * CELL - lw) // 2 + int(rng.integers(-2, 3))
        ly = lr * CELL + (CELL - lh) // 2 + int(rng.integers(-2, 3))
        n_obj = int(rng.integers(min(2, max_objects), max_objects + 1))  # 2..5 shapes
        pairs = [(c, s) for c in COLORS for s in SHAPES]
        order = rng.permutation(len(pairs))
        chosen = []
        # Bias towards repeated shapes so that count questions have answers > 1.
        base_shape = str(rng.choice(SHAPES))
        n_same = int(rng.integers(1, min(MAX_COUNT, n_obj) + 1))
        same = [p for p in (pairs[i] for i in order) if p[1] == base_shape][:n_same]
        chosen.extend(same)
        for i in order:
            if len(chosen) == n_obj:
                break
            p = pairs[i]
            if p in chosen or p[1] == base_shape:
                continue
            # keep every shape's count <= MAX_COUNT
            if sum(1 for c in chosen if c[1] == p[1]) >= MAX_COUNT:
                continue
            chosen.append(p)
        cells = rng.permutation(len(free))[: len(chosen)]
        objs: list[_Obj] = []
        for (color, shape), k in zip(chosen, cells):
            r_, c_ = free[int(k)]
            r = int(rng.integers(8, 12))  # 16..22 px across, inside a 28 px cell
            cx = c_ * CELL + CELL // 2 + int(rng.integers(-2, 3))
            cy = r_ * CELL + CELL // 2 + int(rng.integers(-2, 3))
            objs.append(_Obj(shape, color, cx, cy, r))
        return _Scene(background, textured, objs, label, (lx, ly, lx + lw, ly + lh), scale, grid * CELL, (lr, lc))


def _star(cx, cy, r):
    pts = []
    for k in range(10):
        ang = -np.pi / 2 + k * np.pi / 5
        rad = r if k % 2 == 0 else r * 0.45
        pts.append((cx + rad * np.cos(ang), cy + rad * np.sin(ang)))
    return pts


def _render(scene: _Scene, rng: np.random.Generator) -> Image.Image:
    bg = np.array(BACKGROUNDS[scene.background], dtype=np.int16)
    n = scene.size
    arr = np.broadcast_to(bg, (n, n, 3)).copy()
    if scene.textured:  # light per-pixel noise: still "background" for background_patch_share
        arr += rng.integers(-4, 5, size=(n, n, 1), dtype=np.int16)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    d = ImageDraw.Draw(img)
    for o in scene.objects:
        col = COLORS[o.color]
        x0, y0, x1, y1 = o.box
        if o.shape == "circle":
            d.ellipse((x0, y0, x1, y1), fill=col)
        elif o.shape == "square":
            s = int(round(o.r * 0.85))
            d.rectangle((o.cx - s, o.cy - s, o.cx + s, o.cy + s), fill=col)
        elif o.shape == "triangle":
            d.polygon([(o.cx, y0), (x1, y1 - o.r // 4), (x0, y1 - o.r // 4)], fill=col)
        elif o.shape == "star":
            d.polygon(_star(o.cx, o.cy, o.r), fill=col)
    lx, ly = scene.label_box[:2]
    s = scene.label_scale
    for k, ch in enumerate(scene.label.upper()):
        gx = lx + k * 6 * s
        for row, bits in enumerate(_GLYPHS[ch]):
            for col, b in enumerate(bits):
                if b == "1":
                    d.rectangle((gx + col * s, ly + row * s, gx + col * s + s - 1, ly + row * s + s - 1), fill=TEXT_COLOR)
    return img


def _caption(scene: _Scene) -> str:
    parts = []
    for o in sorted(scene.objects, key=lambda o: (o.cx, o.cy)):
        size = "small" if o.r <= 9 else "large"
        parts.append(f"a {size} {o.color} {o.shape}")
    objs = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    kind = "number" if scene.label.isdigit() else "word"
    return f"{objs} on a {scene.background} background. the {kind} {scene.label} is written in black."


# ----------------------------------------------------------------------------- questions


def _relation(a: _Obj, b: _Obj) -> str | None:
    """Relation of a to b if one axis clearly dominates, else None."""
    dx, dy = a.cx - b.cx, a.cy - b.cy
    if abs(dx) >= 28 and abs(dx) >= 2 * abs(dy):
        return "left" if dx < 0 else "right"
    if abs(dy) >= 28 and abs(dy) >= 2 * abs(dx):
        return "above" if dy < 0 else "below"
    return None


def _target(family: str, rng: np.random.Generator, max_objects: int = 5):
    """The answer to aim for, drawn before the scene so that rejection sampling keeps it balanced."""
    if family == "count":
        return int(rng.integers(1, max(1, min(MAX_COUNT, max_objects - 1)) + 1))
    if family in ("spatial", "where"):
        return RELATIONS[int(rng.integers(len(RELATIONS)))]
    if family == "exists":
        return "yes" if rng.random() < 0.5 else "no"
    return None


def _question(scene: _Scene, family: str, target, rng: np.random.Generator) -> tuple[str, str] | None:
    """(question, answer) of the given family about the scene, or None if the scene can't ask it."""
    objs = scene.objects
    tmpl = _Q[family][int(rng.integers(len(_Q[family])))]
    if family == "color":
        uniq = [o for o in objs if sum(p.shape == o.shape for p in objs) == 1]
        if not uniq:
            return None
        o = uniq[int(rng.integers(len(uniq)))]
        return tmpl.format(shape=o.shape), o.color
    if family == "shape":
        uniq = [o for o in objs if sum(p.color == o.color for p in objs) == 1]
        if not uniq:
            return None
        o = uniq[int(rng.integers(len(uniq)))]
        return tmpl.format(color=o.color), o.shape
    if family == "count":
        want = target
        shapes = [s for s in SHAPES if sum(o.shape == s for o in objs) == want]
        if not shapes:
            return None
        s = shapes[int(rng.integers(len(shapes)))]
        return tmpl.format(shape=s), str(want)
    if family == "spatial":
        want = target
        pairs = [(a, b) for a in objs for b in objs if a is not b and _relation(a, b) == want]
        if not pairs:
            return None
        a, b = pairs[int(rng.integers(len(pairs)))]
        return tmpl.format(c1=a.color, s1=a.shape, c2=b.color, s2=b.shape), want
    if family == "where":
        centre = _Obj("", "", SIZE // 2, SIZE // 2, 0)
        named = [o for o in objs if sum((p.color, p.shape) == (o.color, o.shape) for p in objs) == 1]
        hits = [o for o in named if _relation(o, centre) == target]
        if not hits:
            return None
        a = hits[int(rng.integers(len(hits)))]
        return tmpl.format(c1=a.color, s1=a.shape), target
    if family == "exists":
        present = {(o.color, o.shape) for o in objs}
        if target == "yes":
            c, s = sorted(present)[int(rng.integers(len(present)))]
            return tmpl.format(color=c, shape=s), "yes"
        # hard negatives: the colour or the shape is present, the pair is not
        near = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present
                and any(o.color == c or o.shape == s for o in objs)]
        c, s = near[int(rng.integers(len(near)))]
        return tmpl.format(color=c, shape=s), "no"
    if family == "text":
        return tmpl, scene.label
    raise one_of("family", family, FAMILIES)


def _scene_with(rng: np.random.Generator, families, max_objects: int = 5,
                grid: int = GRID) -> tuple[_Scene, list[tuple[str, str]]]:
    targets = [_target(f, rng, max_objects) for f in families]
    repeated = len(set(families)) < len(families)
    for attempt in range(1000):
        if repeated and attempt and attempt % 50 == 0:  # e.g. two counts of 3 cannot share 5 objects: redraw
            targets = [_target(f, rng, max_objects) for f in families]
        scene = _sample_scene(rng, max_objects, grid)
        qa = [_question(scene, f, t, rng) for f, t in zip(families, targets)]
        if all(q is not None for q in qa):
            return scene, qa
    raise RuntimeError("could not sample a scene for " + ", ".join(families))  # pragma: no cover


def _rng(split: str, seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([SPLIT_CODE[split], seed, index])


def generate(split: str, n: int, seed: int | None = None) -> list[Item]:
    """``n`` items of ``split``; item ``i`` asks family ``FAMILIES[i % 6]`` (balanced families)."""
    split = _check_split(split)
    n = _check_pos_int("n", n)
    seed = DEFAULT_SEED[split] if seed is None else _check_pos_int("seed", seed)
    items = []
    for i in range(n):
        rng = _rng(split, seed, i)
        fam = FAMILIES[i % len(FAMILIES)]
        scene, [(q, a)] = _scene_with(rng, [fam])
        img = _render(scene, rng)
        items.append(Item(f"{split}-{seed}-{i:06d}", img, q, a, fam, _caption(scene)))
    return items


def generate_shared(split: str, n: int, seed: int | None = None) -> list[Item]:
    """:func:`generate`, computed once per ``(split, n, seed)`` in a process and shared (a fresh list of the
    same items): every cell of a grid scores the same eval items with every task, and rendering them again
    for each is wasted work. Callers must not mutate the items or their images: the scoring tasks only read them."""
    split = _check_split(split)
    n = _check_pos_int("n", n)
    seed = DEFAULT_SEED[split] if seed is None else _check_pos_int("seed", seed)
    return list(_generate_memo(split, n, seed))


@functools.lru_cache(maxsize=4)  # a few (split, n, seed) per process; 200 items hold 30 MB of images
def _generate_memo(split: str, n: int, seed: int) -> tuple[Item, ...]:
    return tuple(generate(split, n, seed))


def generate_multi(split: str, n: int, seed: int | None = None, start: int = 0,
                   max_objects: int = 5, grid: int = GRID, extra: tuple[str, ...] = ()) -> list[list[Item]]:
    """Images ``start .. start+n-1``, each with one question of every family (in a random order).

    Used for training: one image encode serves six answers. Item ids end in ``-<family>``.
    Uses a seed stream distinct from :func:`generate` (index offset by 2**40). ``max_objects``
    (1..5) caps the shapes per scene: simpler scenes for a training curriculum (ids get ``-e<k>``;
    one-object scenes have no ``spatial`` question). ``grid`` (3..8) shrinks the canvas to
    ``grid * 28`` px, i.e. ``grid**2`` vision tokens: a resolution curriculum (ids get ``-g<k>``).
    ``extra`` adds one more question of each listed family per image (more signal for the families a
    model learns last; ids get ``-x`` and a different seed stream).
    """
    split = _check_split(split)
    n = _check_pos_int("n", n)
    seed = DEFAULT_SEED[split] if seed is None else _check_pos_int("seed", seed)
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise BadInput(f"start {start!r} is not accepted; accepted: a non-negative integer")
    if max_objects not in (1, 2, 3, 4, 5):
        raise one_of("max_objects", max_objects, (1, 2, 3, 4, 5))
    if grid not in range(3, GRID + 1):
        raise one_of("grid", grid, range(3, GRID + 1))
    for f in extra:
        if f not in FAMILIES + TRAIN_FAMILIES:
            raise one_of("extra family", f, FAMILIES + TRAIN_FAMILIES)
    if split != "train" and any(f in TRAIN_FAMILIES for f in extra):
        raise BadInput(f"extra families {', '.join(TRAIN_FAMILIES)} are for the train split only, not {split!r}")
    fam_pool = [f for f in FAMILIES if not (max_objects == 1 and f == "spatial")]
    return [_multi_one(split, seed, i, max_objects, grid, fam_pool, tuple(extra))[0] for i in range(start, start + n)]


def _multi_one(split, seed, i, max_objects, grid, fam_pool, extra=()):
    rng = _rng(split, seed, (1 << 40) + ((5 - max_objects) << 36) + ((GRID - grid) << 32) + (bool(extra) << 31) + i)
    pool = fam_pool + list(extra)
    fams = [pool[j] for j in rng.permutation(len(pool))]
    scene, qa = _scene_with(rng, fams, max_objects, grid)
    img = _render(scene, rng)
    cap = _caption(scene)
    base = f"{split}-{seed}-m{i:06d}" + (f"-e{max_objects}" if max_objects != 5 else "") + \
        (f"-g{grid}" if grid != GRID else "") + ("-x" if extra else "")
    seen: dict[str, int] = {}
    items = []
    for f, (q, a) in zip(fams, qa):
        seen[f] = seen.get(f, 0) + 1
        items.append(Item(f"{base}-{f}" + (f"{seen[f]}" if seen[f] > 1 else ""), img, q, a, f, cap))
    return items, scene


def generate_multi_with_cells(split: str, n: int, seed: int | None = None, start: int = 0,
                              max_objects: int = 5, grid: int = GRID, extra: tuple[str, ...] = ()):
    """:func:`generate_multi` plus, per image, a ``(grid*grid, 3)`` int array of cell targets.

    Row ``r*grid + c`` describes grid cell (r, c) -- one merged vision token -- as
    ``(colour, shape, text)`` class ids (0 = none): colour ``1 + COLORS index``, shape
    ``1 + SHAPES index``, text ``1 + digit`` or ``11 + 2 * WORDS index + part`` (words span two cells).
    Used to pre-train the testbed's vision tower with a per-token auxiliary loss.
    """
    generate_multi(split, 1, seed, start, max_objects, grid, extra)  # validates the arguments
    n = _check_pos_int("n", n)
    seed = DEFAULT_SEED[split] if seed is None else seed
    fam_pool = [f for f in FAMILIES if not (max_objects == 1 and f == "spatial")]
    groups, cells = [], []
    for i in range(start, start + n):
        items, scene = _multi_one(split, seed, i, max_objects, grid, fam_pool, tuple(extra))
        groups.append(items)
        cells.append(scene_cells(scene))
    return groups, cells


def scene_cells(scene: _Scene) -> np.ndarray:
    g = scene.size // CELL
    t = np.zeros((g * g, 3), dtype=np.int64)
    colors, shapes = list(COLORS), list(SHAPES)
    for o in scene.objects:
        k = (o.cy // CELL) * g + (o.cx // CELL)
        t[k, 0] = 1 + colors.index(o.color)
        t[k, 1] = 1 + shapes.index(o.shape)
    r, c = scene.label_cell
    if scene.label.isdigit():
        t[r * g + c, 2] = 1 + int(scene.label)
    else:
        w = WORDS.index(scene.label)
        t[r * g + c, 2] = 11 + 2 * w
        t[r * g + c + 1, 2] = 12 + 2 * w
    return t


# ----------------------------------------------------------------------------- export / report


def write_sharegpt4v(items, out_dir, mode: str = "qa") -> Path:
    """Write ``out_dir/images/<id>.png`` and ``out_dir/data.jsonl`` (ShareGPT4V conversations).

    ``mode="qa"`` answers the question; ``mode="caption"`` asks for a description and answers
    with the caption (a calibration set of captions, as ShareGPT4V is).
    """
    if mode not in ("qa", "caption"):
        raise one_of("mode", mode, ("qa", "caption"))
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    with open(out / "data.jsonl", "w", encoding="utf-8") as f:
        for it in items:
            rel = f"images/{it.id}.png"
            it.image.save(out / rel, format="PNG")
            if mode == "qa":
                q, a = it.question, it.answer
            else:
                q, a = "describe the image.", it.caption
            rec = {
                "id": it.id,
                "image": rel,
                "family": it.family,
                "conversations": [
                    {"from": "human", "value": f"<image>\n{q}"},
                    {"from": "gpt", "value": a},
                ],
            }
            f.write(json.dumps(rec) + "\n")
    return out


def background_patch_share(image: Image.Image, patch: int = PATCH, tol: int = 12) -> float:
    """Share of ``patch`` x ``patch`` patches whose pixels are all background.

    The background colour is the image's most common colour (pixels quantised to 16 levels);
    a pixel is background if every channel is within ``tol`` of it (so light texture counts).
    """
    a = np.asarray(image.convert("RGB"), dtype=np.int16)
    q = (a // 16).reshape(-1, 3)
    keys = q[:, 0] * 256 + q[:, 1] * 16 + q[:, 2]
    mode = np.bincount(keys).argmax()
    bgc = a.reshape(-1, 3)[keys == mode].mean(axis=0)
    is_bg = (np.abs(a - bgc).max(axis=-1) <= tol)
    h, w = is_bg.shape
    gh, gw = h // patch, w // patch
    if gh == 0 or gw == 0:
        raise BadInput(f"patch {patch!r} is not accepted; accepted: at most the image side ({min(h, w)})")
    blocks = is_bg[: gh * patch, : gw * patch].reshape(gh, patch, gw, patch)
    return float(blocks.all(axis=(1, 3)).mean())
