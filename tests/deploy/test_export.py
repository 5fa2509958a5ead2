"""GPTQ export: the layout (checked against an independent bit-by-bit reference), bit-exact round trips
of codes and zero points, identical logits from `load_gptq`, refusals, and (when gptqmodel is
installed) that GPTQModel / transformers' GPTQ integration read the export to the same logits."""

import copy
import importlib.util
import json
import os

import pytest
import torch

from ptqbench.errors import BadInput
from ptqbench.deploy.export import (
    export_gptq,
    load_gptq,
    load_gptq_weights,
    pack_gptq_layer,
    unpack_gptq_layer,
)
from ptqbench.deploy.packing import load_quantized, save_quantized
from ptqbench.grid.resolve import resolve_cell
from ptqbench.methods.quant import QuantizedWeight, QuantSpec, quantize_rtn

MODEL = "tiny:qwen2-vl"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


# ---- helpers ---------------------------------------------------------------------------------------

def rtn(w: torch.Tensor, spec: QuantSpec, act_order: bool = False, seed: int = 0) -> QuantizedWeight:
    """RTN, optionally with a GPTQ act-order g_idx: groups are formed over a column permutation."""
    if not act_order:
        return quantize_rtn(w, spec)
    perm = torch.randperm(w.shape[1], generator=torch.Generator().manual_seed(seed))
    qp = quantize_rtn(w[:, perm], spec)
    q = torch.empty_like(qp.qweight)
    q[:, perm] = qp.qweight
    g_idx = torch.empty_like(qp.g_idx)
    g_idx[perm] = qp.g_idx
    return QuantizedWeight(q, qp.scale, qp.zero, g_idx, spec)


def block_linears(model, vision=False):
    from ptqbench.models.adapters import adapter_for

    ad = adapter_for(model)
    stacks = [(ad.decoder_path, ad.decoder_layers())]
    if vision:
        stacks.insert(0, (ad.vision_blocks_path, ad.vision_blocks()))
    return {f"{path}.{i}.{n}": lin for path, blocks in stacks for i, blk in enumerate(blocks)
            for n, lin in ad.block_linears(blk).items()}


def make_cell(path, model, spec: QuantSpec, act_order=False, edit=None, method="rtn", vision=False,
              scale_dtype=torch.float16):
    """A cell file like `bench run` writes: the decoder linears (and the vision blocks' with `vision`)
    quantized, everything else as is."""
    qws = {n: rtn(lin.weight.data, spec, act_order, seed=i)
           for i, (n, lin) in enumerate(block_linears(model, vision).items())}
    if edit:
        edit(qws)
    other = {k: v for k, v in model.state_dict().items() if k.removesuffix(".weight") not in qws}
    path.mkdir(parents=True, exist_ok=True)
    save_quantized(path / "model.safetensors", qws, other,
                   {"model": MODEL, "method": method, "bits": spec.bits, "options": {}, "group_size": spec.group_size,
                    "sym": spec.sym, "calib_hash": "test"}, scale_dtype=scale_dtype)
    return path


def fake_quant_model(model, cell):
    """The fake-quant reference: each quantized weight replaced by its dequantization with the scales
    rounded to fp16 (as `bench run` stores them)."""
    ref = copy.deepcopy(model)
    weights, _, _ = load_quantized(cell / "model.safetensors")
    for n, qw in weights.items():
        qw.scale = qw.scale.half().float()
        ref.get_submodule(n).weight.data = qw.dequantize().to(ref.dtype)
    return ref, weights


@pytest.fixture(scope="module")
def inputs(tiny_qwen):
    from ptqbench.models.tiny import tiny_batch, tiny_inputs

    _, processor = tiny_qwen
    return tiny_inputs(processor, tiny_batch(processor, n=2))


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


# ---- an independent reference of the GPTQ layout ------------------------------------------------------

def reference_unpack_columns(words: torch.Tensor, bits: int, n: int) -> list[list[int]]:
    """Codes of each column of a GPTQ-packed (words, cols) int32 tensor, bit by bit: code i of a column
    is bits [i*bits, (i+1)*bits) of the column's little-endian stream of 32-bit words. (For 3 bits this
    is GPTQ's interleave: codes 0-9 at bits 0..29 of word 0, code 10 = bits 30-31 of word 0 + bit 0 of
    word 1, codes 11-20 at bits 1..30 of word 1, code 21 = bit 31 + bits 0-1 of word 2, codes 22-31 at
    bits 2..31 of word 2.)"""
    cols = []
    for c in range(words.shape[1]):
        stream = [(int(words[r, c]) >> b) & 1 for r in range(words.shape[0]) for b in range(32)]
        cols.append([sum(stream[i * bits + k] << k for k in range(bits)) for i in range(n)])
    return cols


def test_three_bit_interleave_matches_gptq_word_layout():
    # 32 input codes of one output column fill exactly 3 words; code 10 straddles words 0/1, code 21 words 1/2.
    q = torch.zeros(1, 32, dtype=torch.uint8)
    q[0, 10], q[0, 21], q[0, 0], q[0, 31] = 0b101, 0b011, 0b111, 0b110
    qw = QuantizedWeight(q.expand(32, 32).contiguous(), torch.ones(32, 1), torch.ones(32, 1),
                         torch.zeros(32, dtype=torch.int32), QuantSpec(3, -1))
    t, _ = pack_gptq_layer(qw)
    words = [int(w) & 0xFFFFFFFF for w in t["qweight"][:, 0]]
    assert t["qweight"].shape == (3, 32) and t["qweight"].dtype == torch.int32
    assert words[0] == 0b111 | (0b01 << 30)  # code 0 at bits 0-2; code 10's low two bits at 30-31
    assert words[1] == 0b1 | (0b1 << 31)  # code 10's top bit at bit 0; code 21's low bit at bit 31
    assert words[2] == 0b01 | (0b110 << 29)  # code 21's top two bits at 0-1; code 31 at bits 29-31
    # zero 1 is stored as 0 (v1 "zeros minus one"): the qzeros of every column are all zero
    assert t["qzeros"].shape == (1, 3) and not t["qzeros"].any()


def test_four_bit_nibbles_little_endian():
    q = torch.arange(8, dtype=torch.uint8).repeat(8, 1) + 1  # codes 1..8 along the input dim
    zero = torch.arange(8, dtype=torch.float32)[:, None] + 1  # zero o+1 for output row o -> stored o
    qw = QuantizedWeight(q, torch.ones(8, 1), zero, torch.zeros(8, dtype=torch.int32), QuantSpec(4, -1))
    t, _ = pack_gptq_layer(qw)
    assert t["qweight"].shape == (1, 8) and (t["qweight"] & 0xFFFFFFFF == 0x87654321).all()
    assert t["qzeros"].shape == (1, 1) and int(t["qzeros"]) & 0xFFFFFFFF == 0x76543210
    assert t["scales"].dtype == torch.float16 and t["scales"].shape == (1, 8)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("grouping", ["g32", "per-channel", "act-order"])
def test_layer_round_trip_bit_exact(bits, grouping):
    torch.manual_seed(bits)
    w = torch.randn(64, 96)
    gs = -1 if grouping == "per-channel" else 32
    qw = rtn(w, QuantSpec(bits, gs), act_order=grouping == "act-order", seed=bits)
    qw.zero = qw.zero.clamp(min=1)  # zero 0 is covered by the shift tests
    t, shifted = pack_gptq_layer(qw, "x")
    n_groups = 1 if gs == -1 else 96 // gs
    assert shifted == 0
    assert t["qweight"].shape == (96 * bits // 32, 64) and t["qzeros"].shape == (n_groups, 64 * bits // 32)
    assert t["scales"].shape == (n_groups, 64) and t["g_idx"].dtype == torch.int32
    # the layout, read by the independent reference: codes along the input dim, zero - 1 along the output dim
    assert reference_unpack_columns(t["qweight"], bits, 96) == qw.qweight.tolist()  # column o = output o
    assert reference_unpack_columns(t["qzeros"].t().contiguous(), bits, 64) == (qw.zero - 1).int().t().tolist()
    back = unpack_gptq_layer(t, bits, gs)
    assert torch.equal(back.qweight, qw.qweight) and torch.equal(back.zero, qw.zero)
    assert torch.equal(back.g_idx, qw.g_idx) and torch.equal(back.scale, qw.scale.half().float())


# ---- whole-model export and load_gptq -------------------------------------------------------------------

@pytest.mark.parametrize("bits,group_size,act_order", [(2, 32, False), (3, 32, True), (3, -1, False),
                                                        (4, -1, False), (4, 32, True), (8, 32, True)])
def test_export_load_gives_identical_logits(tiny_qwen, inputs, tmp_path, bits, group_size, act_order):
    model, _ = tiny_qwen
    cell = make_cell(tmp_path / "cell", model, QuantSpec(bits, group_size), act_order)
    out = tmp_path / "gptq"
    summary = export_gptq(cell, out)
    assert summary.bits == bits and summary.group_size == group_size and summary.desc_act == act_order
    assert summary.n_quantized == 21 and summary.model == MODEL
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["checkpoint_format"] == "gptq" and qc["bits"] == bits
    assert qc["group_size"] == group_size and qc["desc_act"] == act_order and qc["sym"] is False
    assert qc["block_name_to_quantize"] == "model.language_model.layers"

    ref, weights = fake_quant_model(model, cell)
    got, _, _ = load_gptq_weights(out)
    for n, qw in weights.items():  # codes and zero points bit-exact, fp16 scales as stored
        g = got[n]
        assert torch.equal(g.qweight, qw.qweight) and torch.equal(g.zero, qw.zero) and torch.equal(g.g_idx, qw.g_idx)
        assert torch.equal(g.scale, qw.scale)
    loaded = load_gptq(out)
    for n in weights:
        assert torch.equal(loaded.get_submodule(n).weight, ref.get_submodule(n).weight), n
    for k, v in model.state_dict().items():
        if k.removesuffix(".weight") not in weights:
            assert torch.equal(loaded.state_dict()[k], v), k
    assert torch.equal(logits(loaded, inputs), logits(ref, inputs))  # same float32 arithmetic: atol 0


def test_export_of_a_real_gptq_act_order_cell(tmp_path, inputs):
    """`bench run --model tiny:qwen2-vl --methods gptq --bits 4 --group-size 32` (act-order on) in
    process, then the cell the store lists is exported and read back."""
    from ptqbench.config import RunConfig
    from ptqbench.grid.runner import run_grid
    from ptqbench.models.tiny import build_tiny
    from ptqbench.grid.store import ResultsStore

    cfg = RunConfig.from_flat(model=MODEL, methods=["gptq"], bits=[4], group_size=32, calib_n=2, runs=str(tmp_path / "runs"),
                    name="r", tasks=[], options={"gptq": {"act_order": True}}, device="cpu", latency=False)
    summary = run_grid(cfg, log=lambda *a: None)
    assert [c.status for c in summary.cells] == ["done"]
    (cell,) = ResultsStore(tmp_path / "runs").cells(method="gptq")
    cell_dir = tmp_path / "runs" / "r" / "cells" / cell["cell_id"]
    assert resolve_cell(cell["cell_id"][:6], tmp_path / "runs") == cell_dir / "model.safetensors"
    assert resolve_cell(cell_dir) == resolve_cell(cell_dir / "model.safetensors") == cell_dir / "model.safetensors"
    with pytest.raises(BadInput, match="matches 0 cells"):
        resolve_cell("zzzz", tmp_path / "runs")
    with pytest.raises(BadInput, match="neither a path nor a cell"):
        resolve_cell("zzzz", tmp_path / "elsewhere")
    s = export_gptq(cell_dir, tmp_path / "out")
    # the cell keeps fp32 scales (a task scored later on the saved cell sees the exact weights); GPTQ stores fp16
    assert s.scales_rounded > 0 and s.shifted_groups == 0
    assert s.method == "gptq" and s.desc_act and s.bits == 4 and s.group_size == 32
    model, _ = build_tiny("qwen2-vl")
    ref, weights = fake_quant_model(model, cell_dir)
    got, _, _ = load_gptq_weights(tmp_path / "out")
    assert all(torch.equal(got[n].qweight, qw.qweight) and torch.equal(got[n].zero, qw.zero) for n, qw in weights.items())
    assert torch.equal(logits(load_gptq(tmp_path / "out"), inputs), logits(ref, inputs))


def test_vision_tower_cell(tiny_qwen, inputs, tmp_path):
    """A --quantize-vision cell: the loaders' selection rule (prefix + names inside a block) covers the
    vision blocks and the decoder blocks, and nothing else (not the merger, not lm_head)."""
    model, _ = tiny_qwen
    cell = make_cell(tmp_path / "cell", model, QuantSpec(4, 32), vision=True)
    s = export_gptq(cell, tmp_path / "out")
    assert s.n_quantized == 21 + 8
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert qc["block_name_to_quantize"] == "model"
    assert set(qc["modules_in_block_to_quantize"][0]) == {
        "attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
        "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    ref, _ = fake_quant_model(model, cell)
    assert torch.equal(logits(load_gptq(tmp_path / "out"), inputs), logits(ref, inputs))


def test_refuses_cells_the_loaders_cannot_select(tiny_qwen, tmp_path):
    model, _ = tiny_qwen

    def drop(qws):  # one block's down_proj left in full precision
        del qws["model.language_model.layers.1.mlp.down_proj"]

    with pytest.raises(BadInput, match=r"would also take \['model\.language_model\.layers\.1\.mlp\.down_proj'\]"):
        export_gptq(make_cell(tmp_path / "cell", model, QuantSpec(4, 32), edit=drop), tmp_path / "out")


def test_fp32_scales_are_rounded_to_fp16(tiny_qwen, inputs, tmp_path):
    model, _ = tiny_qwen
    cell = make_cell(tmp_path / "cell", model, QuantSpec(4, 32), scale_dtype=torch.float32)
    assert export_gptq(cell, tmp_path / "out").scales_rounded == 21
    ref, _ = fake_quant_model(model, cell)
    assert torch.equal(logits(load_gptq(tmp_path / "out"), inputs), logits(ref, inputs))


def test_processor_and_config_load_from_the_export(tiny_qwen, tmp_path):
    from transformers import AutoConfig, AutoProcessor

    model, processor = tiny_qwen
    out = tmp_path / "gptq"
    export_gptq(make_cell(tmp_path / "cell", model, QuantSpec(4, 32)), out)
    p = AutoProcessor.from_pretrained(out)
    assert type(p) is type(processor) and p.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    assert p.chat_template == processor.chat_template
    cfg = AutoConfig.from_pretrained(out)
    assert cfg.model_type == "qwen2_vl" and cfg.quantization_config["bits"] == 4
    info = json.loads((out / "ptqbench_export.json").read_text())
    assert info["metadata"]["method"] == "rtn" and info["metadata"]["calib_hash"] == "test"


def test_sym_cell_is_marked_sym(tiny_qwen, tmp_path):
    model, _ = tiny_qwen
    s = export_gptq(make_cell(tmp_path / "cell", model, QuantSpec(4, 32, sym=True)), tmp_path / "out")
    assert s.sym  # every zero is 2^(bits-1): kernels that assume it (sym=True) read the same weights
    t, _, qc = load_gptq_weights(tmp_path / "out")
    assert qc["sym"] is True and all(bool((w.zero == 8).all()) for w in t.values())


def test_sharded_export(tiny_qwen, inputs, tmp_path):
    model, _ = tiny_qwen
    cell = make_cell(tmp_path / "cell", model, QuantSpec(4, 32))
    s = export_gptq(cell, tmp_path / "out", max_shard_bytes=200_000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and "model.safetensors.index.json" in s.files
    ref, _ = fake_quant_model(model, cell)
    assert torch.equal(logits(load_gptq(tmp_path / "out"), inputs), logits(ref, inputs))


# ---- zero points of 0 ------------------------------------------------------------------------------------

def _zero_some(qws, top_code=False):
    qw = qws["model.language_model.layers.1.mlp.up_proj"]
    g = qw.g_idx.long()
    qw.zero[0, 0] = 0  # row 0, group 0: make the codes of that group use [0, maxq-1] (or the top code too)
    cols = g == 0
    qw.qweight[0, cols] = qw.qweight[0, cols].clamp(max=qw.spec.maxq - 1)
    if top_code:
        qw.qweight[0, cols.nonzero()[0]] = qw.spec.maxq


def test_zero_point_of_zero_is_shifted_losslessly(tiny_qwen, inputs, tmp_path):
    model, _ = tiny_qwen
    cell = make_cell(tmp_path / "cell", model, QuantSpec(3, 32), edit=_zero_some)
    s = export_gptq(cell, tmp_path / "out")
    assert s.shifted_groups == 1
    ref, weights = fake_quant_model(model, cell)
    got, _, _ = load_gptq_weights(tmp_path / "out")
    name = "model.language_model.layers.1.mlp.up_proj"
    assert got[name].zero[0, 0] == 1 and torch.equal(got[name].dequantize(), weights[name].dequantize())
    assert torch.equal(logits(load_gptq(tmp_path / "out"), inputs), logits(ref, inputs))


def test_zero_point_of_zero_refused_when_not_shiftable(tiny_qwen, tmp_path):
    model, _ = tiny_qwen
    cell = make_cell(tmp_path / "cell", model, QuantSpec(3, 32), edit=lambda q: _zero_some(q, top_code=True))
    with pytest.raises(BadInput, match=r"layers\.1\.mlp\.up_proj.*top code 7"):
        export_gptq(cell, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(BadInput, match=r"up_proj: 1 zero point\(s\) equal 0"):
        export_gptq(make_cell(tmp_path / "cell2", model, QuantSpec(3, 32), edit=_zero_some), tmp_path / "out",
                    shift_zero=False)


def test_gptq_v2_stores_zeros_as_they_are(tiny_qwen, inputs, tmp_path):
    model, _ = tiny_qwen
    cell = make_cell(tmp_path / "cell", model, QuantSpec(2, 32), edit=lambda q: _zero_some(q, top_code=True))
    s = export_gptq(cell, tmp_path / "out", checkpoint_format="gptq_v2")
    assert s.shifted_groups == 0
    ref, weights = fake_quant_model(model, cell)
    got, _, qc = load_gptq_weights(tmp_path / "out")
    assert qc["checkpoint_format"] == "gptq_v2"
    assert all(torch.equal(got[n].qweight, w.qweight) and torch.equal(got[n].zero, w.zero) for n, w in weights.items())
    assert torch.equal(logits(load_gptq(tmp_path / "out"), inputs), logits(ref, inputs))


# ---- refusals ----------------------------------------------------------------------------------------------

def test_refuses_bits_the_format_cannot_pack(tiny_qwen, tmp_path):
    model, _ = tiny_qwen
    with pytest.raises(BadInput, match=r"layer model\.language_model\.layers\.\d\.\S+: 5-bit .* accepted: bits 2, 3, 4, 8"):
        export_gptq(make_cell(tmp_path / "cell", model, QuantSpec(5, 32)), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_refuses_off_grid_zeros(tiny_qwen, tmp_path):
    model, _ = tiny_qwen

    def half_zero(qws):
        qws["model.language_model.layers.2.self_attn.v_proj"].zero += 0.5

    with pytest.raises(BadInput, match=r"layers\.2\.self_attn\.v_proj: zero points that are not integers"):
        export_gptq(make_cell(tmp_path / "cell", model, QuantSpec(4, 32), edit=half_zero), tmp_path / "out")


def test_refuses_widths_not_filling_words():
    qw = quantize_rtn(torch.randn(32, 48), QuantSpec(3, 16))
    with pytest.raises(BadInput, match=r"layer L: input width 48 .* multiples of 32"):
        pack_gptq_layer(qw, "L")
    pack_gptq_layer(quantize_rtn(torch.randn(32, 48), QuantSpec(4, 16)), "L")  # 48 is 6 words of 4-bit codes


def test_refuses_mixed_specs(tiny_qwen, tmp_path):
    model, _ = tiny_qwen

    def mix(qws):
        n = "model.language_model.layers.0.mlp.down_proj"
        qws[n] = quantize_rtn(model.get_submodule(n).weight.data, QuantSpec(4, 64))

    with pytest.raises(BadInput, match="different bits/group sizes"):
        export_gptq(make_cell(tmp_path / "cell", model, QuantSpec(4, 32), edit=mix), tmp_path / "out")


def test_refuses_bad_sources_and_targets(tiny_qwen, tmp_path):
    model, _ = tiny_qwen
    with pytest.raises(BadInput, match="has no saved model"):
        export_gptq(tmp_path / "nowhere", tmp_path / "out")
    cell = make_cell(tmp_path / "cell", model, QuantSpec(4, 32))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    with pytest.raises(BadInput, match="not an empty directory"):
        export_gptq(cell, tmp_path / "busy")
    with pytest.raises(BadInput, match="holds the cell being exported"):
        export_gptq(cell, tmp_path, overwrite=True)
    assert (cell / "model.safetensors").exists()
    assert (tmp_path / "busy" / "keep.txt").exists()
    export_gptq(cell, tmp_path / "busy", overwrite=True)
    assert not (tmp_path / "busy" / "keep.txt").exists() and (tmp_path / "busy" / "config.json").exists()
    with pytest.raises(BadInput, match="does not match base model 'tiny:llava'|not linear layers of 'tiny:llava'"):
        export_gptq(cell, tmp_path / "out", model_name="tiny:llava")
    with pytest.raises(BadInput, match=r"cannot read .*config\.json"):
        load_gptq(cell)  # a cell directory has no config.json
    cfg = json.loads((tmp_path / "busy" / "config.json").read_text())
    cfg["quantization_config"]["quant_method"] = "awq"
    (tmp_path / "busy" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BadInput, match="not a GPTQ checkpoint.*'awq'"):
        load_gptq(tmp_path / "busy")


def _listing(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("target, match", [
    ("afile", r"output '.*afile' is an existing file, not a directory"),
    ("afile/sub", r"output '.*afile/sub' is under '.*afile', which is a file"),
    ("afile/sub/deeper", r"is under '.*afile', which is a file"),
    ("/proc/forbidden", r"output '/proc/forbidden' cannot be written: no directory can be created in '/proc'"),
    ("/proc/forbidden/sub", r"no directory can be created in '/proc'"),
])
def test_output_path_is_checked_before_any_work(tiny_qwen, tmp_path, monkeypatch, target, match):
    from ptqbench.deploy import packing

    if target.startswith("/proc") and not os.path.isdir("/proc"):
        pytest.skip("no /proc here")
    model, _ = tiny_qwen
    cell = make_cell(tmp_path / "cell", model, QuantSpec(4, 32))
    (tmp_path / "afile").write_text("x")
    before = _listing(tmp_path)
    monkeypatch.setattr(packing, "load_quantized", lambda *a: pytest.fail("the cell was read before the target was checked"))
    out = target if target.startswith("/") else tmp_path / target
    for overwrite in (False, True):
        with pytest.raises(BadInput, match=match) as e:
            export_gptq(cell, out, overwrite=overwrite)
        assert "\n" not in str(e.value) and "accepted" in str(e.value)
    assert _listing(tmp_path) == before and (tmp_path / "afile").read_text() == "x"


def test_cli_export_to_bad_targets_is_one_line_exit_2(tiny_qwen, tmp_path, monkeypatch, capsys):
    import sys

    from ptqbench import cli

    model, _ = tiny_qwen
    cell = make_cell(tmp_path / "cell", model, QuantSpec(4, 32))
    (tmp_path / "afile").write_text("x")
    before = _listing(tmp_path)
    for target in (tmp_path / "afile", tmp_path / "afile" / "sub", "/proc/forbidden"):
        monkeypatch.setattr(sys, "argv", ["bench", "export", str(cell), str(target), "--runs", str(tmp_path / "runs")])
        with pytest.raises(SystemExit) as e:
            cli.main()
        out, err = capsys.readouterr()
        assert e.value.code == 2, (out, err)
        assert len((out + err).strip().splitlines()) == 1 and "Traceback" not in out + err, (out, err)
    assert _listing(tmp_path) == before



# ---- real GPTQ loaders (optional) ------------------------------------------------------------------------

HAVE_GPTQMODEL = importlib.util.find_spec("gptqmodel") is not None and importlib.util.find_spec("optimum") is not None
needs_gptqmodel = pytest.mark.skipif(
    not HAVE_GPTQMODEL, reason="gptqmodel + optimum not installed (gptqmodel 7.7 needs torch>=2.14.1 and protobuf>=7.36.2, "
           "which conflicts with lmms-eval's wandb: install them in a separate venv layered on .venv)")


def assert_same_dequantized_weights(gptq_model, ours, expected=21):
    """Every GPTQ layer's own unpacking (dequantize_weight: fp16 scale * (code - zero)) equals our
    float32 dequantization rounded once to fp16: the codes, zeros, scales and g_idx were read as written."""
    n_checked = 0
    for name, mod in gptq_model.named_modules():
        if hasattr(mod, "qweight") and hasattr(mod, "dequantize_weight"):
            theirs = mod.dequantize_weight().t()
            assert torch.equal(theirs.half(), ours.get_submodule(name).weight.half()), name
            n_checked += 1
    assert n_checked == expected


@needs_gptqmodel
@pytest.mark.parametrize("vision", [False, True])
def test_transformers_gptq_integration_reads_the_export(tiny_qwen, inputs, tmp_path, vision):
    """transformers' GPTQ integration (optimum + GPTQModel's CPU kernels) loads a v1 asymmetric 3-bit
    act-order export with a shifted zero point (and a --quantize-vision one) to the weights load_gptq gives."""
    from transformers import AutoModelForImageTextToText

    model, _ = tiny_qwen
    cell = make_cell(tmp_path / "cell", model, QuantSpec(3, 32), act_order=True, edit=_zero_some, vision=vision)
    assert export_gptq(cell, tmp_path / "out").shifted_groups == 1
    ours = load_gptq(tmp_path / "out")
    m = AutoModelForImageTextToText.from_pretrained(tmp_path / "out", dtype=torch.float32, device_map="cpu")
    assert type(m.model.language_model.layers[0].self_attn.q_proj).__module__.startswith("gptqmodel")
    assert_same_dequantized_weights(m, ours, 29 if vision else 21)
    theirs, expected = logits(m, inputs), logits(ours, inputs)
    # The kernel multiplies with fp16-rounded weights: measured 1.1e-4 here (|logits| < 1).
    assert torch.allclose(theirs, expected, atol=1e-3, rtol=0), (theirs - expected).abs().max()


@needs_gptqmodel
@pytest.mark.parametrize("fmt,sym", [("gptq", True), ("gptq_v2", False)])
def test_gptqmodel_load_reads_the_export(tiny_qwen, inputs, tmp_path, fmt, sym):
    """GPTQModel.load reads a v1 symmetric export and a v2 asymmetric one. (It refuses v1 asymmetric
    checkpoints not made by GPTQModel itself; transformers' integration reads those, test above.)
    The TORCH backend is pinned: the automatic choice depends on the CPU, and that kernel runs in fp16."""
    from gptqmodel import BACKEND, GPTQModel

    model, _ = tiny_qwen
    cell = make_cell(tmp_path / "cell", model, QuantSpec(4, 32, sym=sym), act_order=True)
    export_gptq(cell, tmp_path / "out", checkpoint_format=fmt)
    m = GPTQModel.load(str(tmp_path / "out"), device="cpu", dtype=torch.float16, backend=BACKEND.TORCH)
    assert_same_dequantized_weights(m.model, load_gptq(tmp_path / "out"))
    theirs = logits(m.model, inputs).float()
    expected = logits(load_gptq(tmp_path / "out", dtype=torch.float16), inputs).float()
    # Both in fp16 on the CPU, different matmul orders: measured 4.9e-4 (|logits| < 1).
    assert torch.allclose(theirs, expected, atol=2e-3, rtol=0), (theirs - expected).abs().max()
