"""The testbed's training building blocks (testbed/: pool, model, vision, loop; train.py runs a phase)
and the outlier rescale (testbed/outlier_channels.py): the frozen-tower feature cache must feed the
decoder exactly what the live tower would, and the re-initialisation / spectrum / masking helpers do
what they say."""

import importlib
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _load(path):
    """A script loaded from its file, as `python <path>` runs it (it puts the repository root on sys.path)."""
    name = path.replace("/", "_").removesuffix(".py")
    spec = importlib.util.spec_from_file_location(name, ROOT / path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def _stage(name):
    """A stage module of the testbed package (testbed/<name>.py), imported as the scripts import it."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module(f"testbed.{name}")


@pytest.fixture(scope="module")
def tt():
    return _load("testbed/train.py")


@pytest.fixture(scope="module")
def pool():
    return _stage("pool")


def test_spectral_flatness_penalty():
    loop = _stage("loop")
    q = torch.linalg.qr(torch.randn(256, 256))[0]
    assert float(loop.spectral_flatness_penalty([q * 3.0])) < 1e-6  # flat spectrum, any scale
    low = torch.randn(256, 8) @ torch.randn(8, 768)  # rank 8 of 256: about d / rank - 1
    assert 25 < float(loop.spectral_flatness_penalty([low])) < 40
    rnd = float(loop.spectral_flatness_penalty([torch.randn(768, 256)]))
    assert rnd < 1.0


def test_reinit_text_keeps_nothing_of_the_decoder():
    setup = _stage("model")
    lm = torch.nn.ModuleDict({"proj": torch.nn.Linear(64, 64), "norm": torch.nn.LayerNorm(64)})
    with torch.no_grad():
        lm["norm"].weight.fill_(3.0)
    torch.manual_seed(0)
    setup.reinit_text_(lm, 0.004)
    assert abs(float(lm["proj"].weight.detach().std()) - 0.004) < 0.0005
    assert float(lm["proj"].bias.abs().max()) == 0.0 and torch.all(lm["norm"].weight == 1.0)


def test_cached_vision_features_equal_the_live_tower(pool):
    from transformers import Qwen2VLForConditionalGeneration

    from ptqbench.data import synthvqa as sv
    from ptqbench.models import testbed as tb

    tok = tb.build_tokenizer()
    proc = tb.build_processor(tok)
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(tb.testbed_config(tok, layers=1)).eval()
    groups, _ = sv.generate_multi_with_cells("train", 3, seed=5)
    imgs = torch.from_numpy(np.stack([np.asarray(g[0].image.convert("RGB")) for g in groups]))
    feats = _stage("vision").vision_features(model, imgs, proc.image_processor, torch.device("cpu"), batch=2)
    assert feats.shape == (3, 64, 256)
    enc = pool.Encoder(proc, 64, False)
    ids, attn, _, mm = pool.collate([enc.encode(g) for g in groups], 0, model.config.image_token_id)
    thw = torch.tensor([[1, sv.SIZE // 14, sv.SIZE // 14]] * 3)
    from transformers.modeling_outputs import BaseModelOutputWithPooling
    with torch.no_grad():
        live = model(input_ids=ids, attention_mask=attn, image_grid_thw=thw, mm_token_type_ids=mm,
                     pixel_values=pool.patchify(imgs.permute(0, 3, 1, 2), proc.image_processor)).logits
        cached = model(input_ids=ids, attention_mask=attn, image_grid_thw=thw, mm_token_type_ids=mm,
                       mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=tuple(feats))}).logits
    assert torch.allclose(live, cached, atol=1e-5), float((live - cached).abs().max())


def test_keep_families_masks_the_other_answers(pool):
    from ptqbench.data import synthvqa as sv
    from ptqbench.models import testbed as tb

    proc = tb.build_processor(tb.build_tokenizer())
    enc = pool.Encoder(proc, 64, False)
    group = sv.generate_multi("train", 1, seed=1, extra=("spatial", "where"))[0]
    _, labels = enc.encode(group)
    fams = [it.family for it in group]
    kept = pool.keep_families(labels, fams, ("where", "spatial"))
    text = proc.tokenizer.decode([t for t in kept if t != -100])
    want = "".join(it.answer + "<|im_end|>" for it in group if it.family in ("where", "spatial"))
    assert text == want and len(kept) == len(labels)
    assert pool.keep_families(labels, fams, tuple(sv.FAMILIES + sv.TRAIN_FAMILIES)) == labels


def test_single_turn_chats_are_the_evaluation_prompt(pool):
    """--single-turn trains each question as the eval task builds it: image, instruction, one question."""
    from ptqbench.data import synthvqa as sv
    from ptqbench.eval import tasks as T
    from ptqbench.models import testbed as tb

    proc = tb.build_processor(tb.build_tokenizer())
    enc = pool.Encoder(proc, 64, False)
    it = sv.generate_multi("train", 1, seed=2)[0][3]
    ids, labels = enc.encode([it])
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": T.user_text(it.question)}]}]
    prompt = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    p_ids = proc.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    k = p_ids.index(enc.image_id)
    p_ids = p_ids[:k] + [enc.image_id] * 64 + p_ids[k + 1:]
    assert ids[:len(p_ids)] == p_ids and all(t == -100 for t in labels[:len(p_ids)])
    assert proc.tokenizer.decode([t for t in labels if t != -100]) == it.answer + "<|im_end|>"


@pytest.mark.parametrize("argv, bad", [
    (["--single-turn"], "--single-turn needs --freeze-vision"),
    (["--focus", "size", "--focus-steps", "3"], "--focus 'size'"),
    (["--focus-steps", "3"], "--focus-steps needs --focus"),
    (["--focus-batch", "32"], "--focus-batch needs --focus-steps"),
    (["--focus-keep", "1.5"], "--focus-keep 1.5"),
    (["--focus", "where", "--focus-steps", "3", "--focus-keep", "0.2"], "--focus-keep needs --single-turn"),
    (["--mrope-section", "8,12"], "--mrope-section '8,12'"),
    (["--mrope-section", "8,12,13"], "--mrope-section '8,12,13'"),
])
def test_train_testbed_refuses_bad_flags(tt, argv, bad, capsys):
    with pytest.raises(SystemExit) as e:
        tt.main(argv + ["--images", "8", "--prepare-only", "--cache", "/nonexistent/never-written"])
    assert e.value.code == 2 and bad in capsys.readouterr().err


def test_testbed_config_rope_theta():
    from ptqbench.models import testbed as tb

    assert tb.testbed_config(layers=1).text_config.rope_parameters["rope_theta"] == 10000.0
    assert tb.testbed_config(layers=1, rope_theta=1e6).text_config.rope_parameters["rope_theta"] == 1e6


def test_mrope_section_moves_image_tokens_only():
    """--mrope-section reaches the config and changes how image tokens are rotated; a text-only prompt,
    whose temporal, row and column positions are the same number, is unchanged."""
    from transformers import Qwen2VLForConditionalGeneration
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    from ptqbench.models import testbed as tb

    tok = tb.build_tokenizer()
    ids_text = torch.tensor([tok("where is the red circle?")["input_ids"]])
    cfg_a = tb.testbed_config(tok, layers=1)
    image_id = cfg_a.image_token_id
    ids_img = torch.cat([ids_text[:, :2], torch.full((1, 64), image_id), ids_text[:, 2:]], 1)
    feats = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    outs = []
    for section in ((8, 12, 12), (0, 16, 16)):
        cfg = tb.testbed_config(tok, layers=1, mrope_section=section)
        assert cfg.text_config.rope_parameters["mrope_section"] == list(section)
        torch.manual_seed(0)
        model = Qwen2VLForConditionalGeneration(cfg).eval()
        with torch.no_grad():
            text = model(input_ids=ids_text).logits
            img = model(input_ids=ids_img, image_grid_thw=torch.tensor([[1, 16, 16]]),
                        mm_token_type_ids=(ids_img == image_id).long(),
                        mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=(feats,))}).logits
        outs.append((text, img))
    assert torch.allclose(outs[0][0], outs[1][0], atol=1e-5)
    assert not torch.allclose(outs[0][1][:, -1], outs[1][1][:, -1], atol=1e-4)


def test_outlier_channels_keep_the_function_and_move_the_scale(tiny_qwen):
    import copy

    oc = _load("testbed/outlier_channels.py")
    model = copy.deepcopy(tiny_qwen[0]).float().eval()
    cfg = model.config.get_text_config()
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    layer = model.model.language_model.layers[0]
    down_before = layer.mlp.down_proj.weight.clone()
    chosen = oc.add_outlier_channels(model, k=2, scale=3.0)
    with torch.no_grad():
        after = model(input_ids=ids).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
    assert len(chosen["up_to_down"]) == len(model.model.language_model.layers)
    cols = chosen["up_to_down"][0]
    torch.testing.assert_close(layer.mlp.down_proj.weight[:, cols], down_before[:, cols] / 3.0)
    others = [c for c in range(down_before.shape[1]) if c not in cols]
    assert torch.equal(layer.mlp.down_proj.weight[:, others], down_before[:, others])
    with pytest.raises(ValueError, match="k must be a positive integer"):
        oc.add_outlier_channels(model, k=0, scale=3.0)


def test_outlier_channels_cli_rejects_bad_flags(tmp_path, capsys):
    oc = _load("testbed/outlier_channels.py")
    assert oc.main([str(tmp_path), str(tmp_path / "out"), "--scale", "1"]) == 2
    assert "--scale > 1" in capsys.readouterr().err
