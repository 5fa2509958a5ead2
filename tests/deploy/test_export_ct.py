"""compressed-tensors export: the layout (checked bit by bit without the package), the config, refusals,
the format chosen per cell, and -- with compressed-tensors installed (the `export` extra) -- that the
package's own readers (its dequantizer, its compressors, transformers' integration) read the export
back to ptqbench's weights."""

import copy
import importlib.util
import json
import sys

import pytest
import torch

from deploy.test_export import fake_quant_model, logits, make_cell, reference_unpack_columns, rtn
from ptqbench.deploy.export_ct import export_cell, export_compressed_tensors, pack_ct_layer
from ptqbench.deploy.packing import load_quantized, save_quantized
from ptqbench.errors import BadInput
from ptqbench.methods.quant import QuantizedWeight, QuantSpec, install_activation_quantizers

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

HAVE_CT = importlib.util.find_spec("compressed_tensors") is not None
needs_ct = pytest.mark.skipif(not HAVE_CT, reason="compressed-tensors not installed (pip install -e '.[export]')")
DECODER = "model.language_model.layers"


@pytest.fixture(scope="module")
def inputs(tiny_qwen):
    from ptqbench.models.tiny import tiny_batch, tiny_inputs

    return tiny_inputs(tiny_qwen[1], tiny_batch(tiny_qwen[1], n=2))


def wa_cell(path, model, spec, act_bits=8, **kw):
    """A weight-activation cell as `bench run --act-bits` saves it: act_bits in the cell's options."""
    cell = make_cell(path, model, spec, **kw)
    weights, other, meta = load_quantized(cell / "model.safetensors")
    meta["options"] = {"act_bits": act_bits}
    scale_dtype = kw.get("scale_dtype", torch.float16)
    save_quantized(cell / "model.safetensors", weights, other, meta, scale_dtype=scale_dtype)
    return cell


def unquantized_linears(model, quantized):
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in quantized]


def qconfig(out):
    return json.loads((out / "config.json").read_text())["quantization_config"]


# ---- the layout, without the package ----------------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("gs", [32, -1])
def test_pack_quantized_layout_bit_by_bit(bits, gs):
    torch.manual_seed(bits)
    qw = rtn(torch.randn(40, 96), QuantSpec(bits, gs))  # 40 rows: the zero points' packed dim is not whole words
    t = pack_ct_layer(qw, "pack-quantized", sym=False, scale_dtype=torch.float16)
    assert set(t) == {"weight_packed", "weight_shape", "weight_scale", "weight_zero_point"}
    assert t["weight_packed"].shape == (40, -(-96 * bits // 32)) and t["weight_packed"].dtype == torch.int32
    assert t["weight_shape"].tolist() == [40, 96] and t["weight_shape"].dtype == torch.int64
    # codes of row o: one little-endian stream of words along the input dim, unsigned (signed code + 2^(b-1))
    assert reference_unpack_columns(t["weight_packed"].t().contiguous(), bits, 96) == qw.qweight.tolist()
    n_groups = qw.scale.shape[1]
    assert t["weight_zero_point"].shape == (-(-40 * bits // 32), n_groups)
    assert reference_unpack_columns(t["weight_zero_point"], bits, 40) == qw.zero.int().t().tolist()
    assert torch.equal(t["weight_scale"], qw.scale.half())


@pytest.mark.parametrize("bits", [4, 8])
def test_int_quantized_layout_is_signed(bits):
    qw = rtn(torch.randn(16, 64), QuantSpec(bits, 32))
    half = 2 ** (bits - 1)
    t = pack_ct_layer(qw, "int-quantized", sym=False, scale_dtype=torch.float32)
    assert t["weight"].dtype == torch.int8 and torch.equal(t["weight"].long(), qw.qweight.long() - half)
    assert t["weight_zero_point"].dtype == torch.int8 and torch.equal(t["weight_zero_point"].float(), qw.zero - half)
    assert torch.equal(t["weight_scale"], qw.scale) and t["weight_scale"].dtype == torch.float32
    # W = s * (q_signed - zp_signed), the cell's own (q - zero) * s
    g = qw.g_idx.long()
    assert torch.equal((t["weight"].float() - t["weight_zero_point"].float()[:, g]) * qw.scale[:, g], qw.dequantize())
    assert "weight_zero_point" not in pack_ct_layer(qw, "int-quantized", sym=True, scale_dtype=torch.float32)


# ---- whole exports ------------------------------------------------------------------------------------

def test_weight_only_config_and_ignore(tiny_qwen, tmp_path):
    model, _ = tiny_qwen
    cell = make_cell(tmp_path / "cell", model, QuantSpec(4, 32))
    s = export_compressed_tensors(cell, tmp_path / "out")
    assert (s.export_format, s.layout, s.act_bits, s.bits, s.group_size, s.sym) == ("compressed-tensors",
                                                                                    "pack-quantized", 16, 4, 32, False)
    qc = qconfig(tmp_path / "out")
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized" and qc["version"] == "0.20.0"
    assert qc["quantization_status"] == "compressed"
    (group,) = qc["config_groups"].values()
    assert group["targets"] == ["Linear"] and group["input_activations"] is None and group["format"] == "pack-quantized"
    assert group["weights"] == {"dynamic": False, "group_size": 32, "num_bits": 4, "strategy": "group",
                                "symmetric": False, "type": "int"}
    weights, _, _ = load_quantized(cell / "model.safetensors")
    assert qc["ignore"] == unquantized_linears(model, weights)  # every full-precision linear, in model order
    assert "lm_head" in qc["ignore"] and "model.visual.merger.mlp.0" in qc["ignore"]
    assert not any(n.startswith(DECODER) for n in qc["ignore"])
    assert json.loads((tmp_path / "out" / "ptqbench_export.json").read_text())["layout"] == "pack-quantized"


def test_weight_activation_config(tiny_qwen, tmp_path):
    model, _ = tiny_qwen
    s = export_compressed_tensors(wa_cell(tmp_path / "cell", model, QuantSpec(4, -1, sym=True)), tmp_path / "out")
    assert (s.layout, s.act_bits, s.sym, s.group_size) == ("int-quantized", 8, True, -1)
    qc = qconfig(tmp_path / "out")
    (group,) = qc["config_groups"].values()
    assert qc["format"] == group["format"] == "int-quantized"
    assert group["input_activations"] == {"dynamic": True, "group_size": None, "num_bits": 8, "strategy": "token",
                                          "symmetric": True, "type": "int"}
    assert group["weights"]["strategy"] == "channel" and group["weights"]["group_size"] is None
    assert group["weights"]["symmetric"] is True
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "out" / "model.safetensors"))
    name = f"{DECODER}.0.mlp.down_proj"
    assert state[f"{name}.weight"].dtype == torch.int8 and f"{name}.weight_zero_point" not in state
    assert state[f"{name}.weight_scale"].shape == (64, 1)


def test_vision_cell_ignores_only_the_unquantized(tiny_qwen, tmp_path):
    model, _ = tiny_qwen
    cell = make_cell(tmp_path / "cell", model, QuantSpec(4, 32), vision=True)
    assert export_compressed_tensors(cell, tmp_path / "out").n_quantized == 21 + 8
    ignore = qconfig(tmp_path / "out")["ignore"]
    assert ignore == ["model.visual.merger.mlp.0", "model.visual.merger.mlp.2", "lm_head"]


def test_fp32_scales_stay_fp32(tiny_qwen, tmp_path):
    model, _ = tiny_qwen
    s = export_compressed_tensors(make_cell(tmp_path / "cell", model, QuantSpec(3, 32), scale_dtype=torch.float32),
                                  tmp_path / "out")
    assert s.scale_dtype == "float32" and s.scales_rounded == 0


# ---- refusals and the format chosen per cell -------------------------------------------------------------

def test_refuses_act_order(tiny_qwen, tmp_path):
    model, _ = tiny_qwen
    cell = make_cell(tmp_path / "cell", model, QuantSpec(4, 32), act_order=True)
    with pytest.raises(BadInput, match=r"layer model\.language_model\.layers\.0\.\S+: an act-order g_idx .* accepted"):
        export_compressed_tensors(cell, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_refuses_off_grid_zeros_and_mixed_specs(tiny_qwen, tmp_path):
    model, _ = tiny_qwen
    name = f"{DECODER}.2.self_attn.v_proj"

    def half_zero(qws):
        qws[name].zero += 0.5

    with pytest.raises(BadInput, match=r"layers\.2\.self_attn\.v_proj: zero points that are not integers"):
        export_compressed_tensors(make_cell(tmp_path / "a", model, QuantSpec(4, 32), edit=half_zero), tmp_path / "out")

    def mix(qws):
        qws[name] = rtn(model.get_submodule(name).weight.data, QuantSpec(4, 64))

    with pytest.raises(BadInput, match="different bits/group sizes"):
        export_compressed_tensors(make_cell(tmp_path / "b", model, QuantSpec(4, 32), edit=mix), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_format_follows_the_cell(tiny_qwen, tmp_path):
    model, _ = tiny_qwen
    wa = wa_cell(tmp_path / "wa", model, QuantSpec(4, 32, sym=True))
    wo = make_cell(tmp_path / "wo", model, QuantSpec(4, 32))
    assert export_cell(wa, tmp_path / "o1").export_format == "compressed-tensors"
    assert export_cell(wo, tmp_path / "o2").export_format == "gptq"
    assert export_cell(wo, tmp_path / "o3", export_format="compressed-tensors").layout == "pack-quantized"
    assert export_cell(wo, tmp_path / "o4", export_format="gptq_v2").export_format == "gptq_v2"
    for fmt in ("gptq", "gptq_v2"):
        with pytest.raises(BadInput, match=r"weight-activation cell \(A8\).* accepted: format compressed-tensors"):
            export_cell(wa, tmp_path / "o5", export_format=fmt)
    with pytest.raises(BadInput, match=r"export format 'awq' is not accepted; accepted: gptq, gptq_v2, compressed-tensors"):
        export_cell(wo, tmp_path / "o5", export_format="awq")
    assert not (tmp_path / "o5").exists()


def run_cli(monkeypatch, capsys, *argv):
    from ptqbench import cli

    monkeypatch.setattr(sys, "argv", ["bench", *map(str, argv)])
    code = 0
    try:
        cli.main()
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    if code:  # an error is one plain line (rich may wrap a success message to the terminal's width)
        assert len((out + err).strip().splitlines()) == 1 and "Traceback" not in out + err, (out, err)
    return code, " ".join((out + err).split())


def test_cli_export(tiny_qwen, tmp_path, monkeypatch, capsys):
    model, _ = tiny_qwen
    wa = wa_cell(tmp_path / "wa", model, QuantSpec(8, -1, sym=True))
    code, text = run_cli(monkeypatch, capsys, "export", wa, tmp_path / "out")
    assert code == 0 and "(compressed-tensors int-quantized): rtn w8a8 g-1 desc_act=False sym=True, 21 layers" in text, text
    assert qconfig(tmp_path / "out")["format"] == "int-quantized"
    code, text = run_cli(monkeypatch, capsys, "export", wa, tmp_path / "gptq", "--format", "gptq")
    assert code == 2 and "accepted: format compressed-tensors" in text and not (tmp_path / "gptq").exists()


# ---- read back by compressed-tensors (the `export` extra) -------------------------------------------------

def ct_dequantized(model, out):
    """compressed-tensors' own model-free reader: every targeted, non-ignored tensor dequantized. Its
    int-quantized matching takes every `weight` tensor, so modules that are not linear are named too."""
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer
    from safetensors.torch import load_file

    not_linear = [n for n, m in model.named_modules()
                  if not isinstance(m, torch.nn.Linear) and any(True for _ in m.parameters(recurse=False))]
    reader = CompressedTensorsDequantizer(out, ignore=not_linear, dtype=torch.float32)
    return reader.validate(load_file(str(out / "model.safetensors"))), reader.quant_config


@needs_ct
@pytest.mark.parametrize("bits,gs,sym,act_bits,scale_dtype", [
    (4, 32, False, 16, torch.float16), (3, -1, False, 16, torch.float16), (2, 32, True, 16, torch.float32),
    (8, 32, False, 16, torch.float16), (4, 32, True, 8, torch.float16), (8, -1, True, 8, torch.float32),
    (8, 32, False, 8, torch.float16)])
def test_compressed_tensors_reads_every_layer_back(tiny_qwen, tmp_path, bits, gs, sym, act_bits, scale_dtype):
    model, _ = tiny_qwen
    spec = QuantSpec(bits, gs, sym=sym)
    cell = (wa_cell(tmp_path / "cell", model, spec, act_bits, scale_dtype=scale_dtype) if act_bits < 16
            else make_cell(tmp_path / "cell", model, spec, scale_dtype=scale_dtype))
    export_compressed_tensors(cell, tmp_path / "out")
    got, config = ct_dequantized(model, tmp_path / "out")
    (scheme,) = config.config_groups.values()
    assert (scheme.input_activations is None) == (act_bits == 16)
    if act_bits < 16:
        ia = scheme.input_activations
        assert (ia.num_bits, ia.strategy, ia.dynamic, ia.symmetric, ia.type) == (8, "token", True, True, "int")
    weights, other, _ = load_quantized(cell / "model.safetensors")
    assert set(config.ignore) >= set(unquantized_linears(model, weights))
    for n, qw in weights.items():  # the package's dequantization in the scales' dtype: ours, rounded once to it
        assert torch.equal(got[f"{n}.weight"], qw.dequantize().to(scale_dtype).float()), n
    for k, v in other.items():
        assert torch.equal(got[k], v), k


@needs_ct
@pytest.mark.parametrize("bits,sym,act_bits", [(4, False, 16), (3, True, 16), (4, True, 8), (8, False, 8)])
def test_compressors_write_the_same_tensors(tiny_qwen, tmp_path, bits, sym, act_bits):
    """compressed-tensors' own compressor, given our dequantized weight and (signed) qparams, writes
    bit-identical tensors: the layouts are the same, not merely compatible."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    model, _ = tiny_qwen
    spec = QuantSpec(bits, 32, sym=sym)
    cell = (wa_cell(tmp_path / "cell", model, spec, act_bits, scale_dtype=torch.float32) if act_bits < 16
            else make_cell(tmp_path / "cell", model, spec, scale_dtype=torch.float32))
    export_compressed_tensors(cell, tmp_path / "out")
    qc = QuantizationConfig.model_validate(qconfig(tmp_path / "out"))
    (scheme,) = qc.config_groups.values()
    compressor = BaseCompressor.get_value_from_registry(qc.format)
    state = load_file(str(tmp_path / "out" / "model.safetensors"))
    weights, _, _ = load_quantized(cell / "model.safetensors")
    for n, qw in weights.items():
        half = 2 ** (bits - 1)
        theirs = compressor.compress({"weight": qw.dequantize(), "weight_scale": qw.scale,
                                      "weight_zero_point": (qw.zero - half).to(torch.int8)}, scheme)
        ours = {k.removeprefix(f"{n}."): v for k, v in state.items() if k.startswith(f"{n}.") and k != f"{n}.bias"}
        assert set(theirs) == set(ours), n
        assert all(torch.equal(theirs[k], ours[k]) for k in ours), n


def ct_convention_hooks(model, names, bits):
    """compressed-tensors' fake activation quantizer (calculate_qparams): scale = absmax / ((2^b - 1) / 2),
    a 0 scale replaced by eps; ptqbench's (and vLLM's int8 kernel's) divides by 2^(b-1) - 1 instead."""
    def hook(module, args):
        x = args[0].float()
        s = x.abs().amax(-1, keepdim=True) / ((2**bits - 1) / 2)
        s = torch.where(s == 0, torch.finfo(s.dtype).eps, s)
        q = torch.clamp(torch.round(x / s), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * s
        return (q.to(args[0].dtype),) + tuple(args[1:])

    return [model.get_submodule(n).register_forward_pre_hook(hook) for n in names]


@needs_ct
@pytest.mark.parametrize("bits,gs,act_bits", [(4, 32, 16), (4, 32, 8), (8, -1, 8)])
def test_transformers_loads_the_export(tiny_qwen, inputs, tmp_path, bits, gs, act_bits):
    """transformers' compressed-tensors integration loads a symmetric export (pack-quantized, and
    int-quantized with its activation quantizer) to exactly our weights; a W/A export's logits equal
    our model's with compressed-tensors' activation scale convention, and stay close to ptqbench's own."""
    from transformers import AutoModelForImageTextToText

    model, _ = tiny_qwen
    spec = QuantSpec(bits, gs, sym=True)
    cell = (wa_cell(tmp_path / "cell", model, spec, act_bits) if act_bits < 16
            else make_cell(tmp_path / "cell", model, spec))
    export_compressed_tensors(cell, tmp_path / "out")
    m = AutoModelForImageTextToText.from_pretrained(tmp_path / "out", dtype=torch.float32, device_map="cpu")
    ref, weights = fake_quant_model(model, cell)
    theirs = logits(m, inputs)  # the first forward decompresses
    for n in weights:
        assert torch.equal(m.get_submodule(n).weight, ref.get_submodule(n).weight), n
    if act_bits == 16:
        assert torch.equal(theirs, logits(ref, inputs))
        return
    ct_ref = copy.deepcopy(ref)
    ct_convention_hooks(ct_ref, weights, act_bits)
    assert torch.equal(theirs, logits(ct_ref, inputs))
    install_activation_quantizers([ref.get_submodule(n) for n in weights], act_bits)
    # 127 vs 127.5 per token: measured 7.5e-3 (W4A8) on logits below 0.75 in magnitude
    assert torch.allclose(theirs, logits(ref, inputs), atol=2e-2, rtol=0)


@needs_ct
def test_transformers_dequantize_path_reads_asymmetric_exports(tiny_qwen, inputs, tmp_path):
    """compressed-tensors 0.20 cannot load an asymmetric pack-quantized checkpoint compressed in
    transformers (its own exports included: the zero point is left unpacked on the meta device, a size
    mismatch); transformers' dequantize=True path reads it, in the scales' fp16."""
    from transformers import AutoModelForImageTextToText, CompressedTensorsConfig

    model, _ = tiny_qwen
    cell = make_cell(tmp_path / "cell", model, QuantSpec(4, 32))
    export_compressed_tensors(cell, tmp_path / "out")
    m = AutoModelForImageTextToText.from_pretrained(tmp_path / "out", dtype=torch.float32, device_map="cpu",
                                                    quantization_config=CompressedTensorsConfig(dequantize=True))
    ref, weights = fake_quant_model(model, cell)
    for n, qw in weights.items():
        assert torch.equal(m.get_submodule(n).weight, qw.dequantize().half().float()), n
    # fp16-rounded weights: measured 1.9e-4 on logits below 0.75 in magnitude
    assert torch.allclose(logits(m, inputs), logits(ref, inputs), atol=2e-3, rtol=0)


def test_a_real_smoothquant_w4a8_cell(tmp_path, inputs, tiny_qwen):
    """`bench run --model tiny:qwen2-vl --methods smoothquant --bits 4 --act-bits 8 --group-size 32` in
    process, then the cell (its smoothing folded into the norms it saved) exported with the default format;
    with compressed-tensors installed, transformers runs the export to our model's logits under
    compressed-tensors' activation scale convention."""
    from ptqbench.config import RunConfig
    from ptqbench.grid.runner import run_grid
    from ptqbench.grid.store import ResultsStore

    cfg = RunConfig.from_flat(model="tiny:qwen2-vl", methods=["smoothquant"], bits=[4], act_bits=[8], group_size=32,
                              calib_n=2, runs=str(tmp_path / "runs"), name="r", tasks=[], device="cpu", latency=False)
    assert [c.status for c in run_grid(cfg, log=lambda *a: None).cells] == ["done"]
    (row,) = ResultsStore(tmp_path / "runs").cells(method="smoothquant")
    cell = tmp_path / "runs" / "r" / "cells" / row["cell_id"] / "model.safetensors"
    s = export_cell(cell, tmp_path / "out")
    assert (s.export_format, s.layout, s.act_bits, s.method) == ("compressed-tensors", "int-quantized", 8, "smoothquant")
    if not HAVE_CT:
        return
    from transformers import AutoModelForImageTextToText

    weights, other, _ = load_quantized(cell)
    ref = copy.deepcopy(tiny_qwen[0])
    ref.load_state_dict({**other, **{f"{n}.weight": qw.dequantize() for n, qw in weights.items()}})
    ct_convention_hooks(ref, weights, 8)
    m = AutoModelForImageTextToText.from_pretrained(tmp_path / "out", dtype=torch.float32, device_map="cpu")
    assert torch.equal(logits(m, inputs), logits(ref, inputs))


def test_a_static_w8a8_cell_exports_its_input_scales(tmp_path, inputs, tiny_qwen):
    """A per-tensor static cell (`--act-scheme tensor`) exports with static `input_activations` and each
    linear's calibrated scale as `input_scale`; with compressed-tensors installed, transformers runs it to
    exactly our model's logits (a static scale leaves no convention to differ on)."""
    from ptqbench.config import RunConfig
    from ptqbench.grid.runner import run_grid
    from ptqbench.grid.store import ResultsStore
    from ptqbench.methods.quant import install_static_activation_quantizers

    cfg = RunConfig.from_flat(model="tiny:qwen2-vl", methods=["rtn"], bits=[8], act_bits=[8], act_scheme="tensor",
                              group_size=-1, sym=True, calib_n=2, runs=str(tmp_path / "runs"), name="r", tasks=[],
                              device="cpu", latency=False)
    assert [c.status for c in run_grid(cfg, log=lambda *a: None).cells] == ["done"]
    (row,) = ResultsStore(tmp_path / "runs").cells(method="rtn")
    cell = tmp_path / "runs" / "r" / "cells" / row["cell_id"] / "model.safetensors"
    export_cell(cell, tmp_path / "out")
    (group,) = qconfig(tmp_path / "out")["config_groups"].values()
    assert group["input_activations"] == {"dynamic": False, "group_size": None, "num_bits": 8, "strategy": "tensor",
                                          "symmetric": True, "type": "int"}
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "out" / "model.safetensors"))
    weights, other, _ = load_quantized(cell)
    for n, qw in weights.items():
        assert torch.equal(state[f"{n}.input_scale"], qw.extras["act_scale"].reshape(1)), n
    if not HAVE_CT:
        return
    from transformers import AutoModelForImageTextToText

    ref = copy.deepcopy(tiny_qwen[0])
    ref.load_state_dict({**other, **{f"{n}.weight": qw.dequantize() for n, qw in weights.items()}})
    install_static_activation_quantizers([(ref.get_submodule(n), qw.extras["act_scale"]) for n, qw in weights.items()], 8)
    m = AutoModelForImageTextToText.from_pretrained(tmp_path / "out", dtype=torch.float32, device_map="cpu")
    assert torch.allclose(logits(m, inputs), logits(ref, inputs), atol=1e-5, rtol=0)
