"""AWQ pinned against RTN and against itself: alpha 0 without clipping is RTN bit for bit, folding keeps the
FP block function, the search and the clip search pick their minima, and AWQ beats RTN on a block.

The numerical comparison with mit-han-lab/llm-awq (identical alphas, scales, clip max_val and final
weights on a Llama decoder layer) was done outside the repository; see the method's docstring."""

import copy

import pytest
import torch

from _helpers import outlier_model  # noqa: E402
from torch import nn

from ptqbench.models.adapters import adapter_for
from ptqbench.models.adapters.families import LLAMA_DECODER
from ptqbench.engine.blockwise import quantize_model
from ptqbench.methods import QuantSpec, get_method
from ptqbench.methods.awq import AWQ, clamp_groups, clip_search, quantize_clipped
from ptqbench.methods.scale_search import (
    TokenLoss,
    alpha_grid,
    fake_quant_weight,
    fold_scales,
    scale_groups,
    scales_for,
    search_block_scales,
)
from ptqbench.methods.base import Method
from ptqbench.methods.quant import quantize_rtn


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py




def _quantize(model, calib, name, bits=3, **opts):
    m = copy.deepcopy(model)
    res = quantize_model(m, adapter_for(m), calib, get_method(name)(QuantSpec(bits=bits, group_size=32), **opts))
    return m, res


def test_alpha_zero_without_clip_equals_rtn(tiny_qwen, tiny_calib):
    model = tiny_qwen[0]
    m_awq, r_awq = _quantize(model, tiny_calib, "awq", alpha_max=0.0, clip=False)
    m_rtn, r_rtn = _quantize(model, tiny_calib, "rtn")
    assert r_awq.quantized.keys() == r_rtn.quantized.keys()
    for n, qa in r_awq.quantized.items():
        qr = r_rtn.quantized[n]
        assert torch.equal(qa.qweight, qr.qweight), n
        assert torch.equal(qa.scale, qr.scale) and torch.equal(qa.zero, qr.zero), n
    sa, sr = m_awq.state_dict(), m_rtn.state_dict()
    assert all(torch.equal(sa[k], sr[k]) for k in sr)  # norms untouched too
    assert set(r_awq.method_info["alpha"]["0"].values()) == {0.0}


def test_alpha_grid_matches_reference():
    g = alpha_grid()
    assert len(g) == 20 and g[0] == 0.0 and g[-1] == 0.95 and 1.0 not in g
    assert alpha_grid(20, 0.0) == [0.0]
    x = torch.rand(16) * 3
    s = scales_for(x, 0.5)
    assert torch.allclose(s.max() * s.min(), torch.tensor(1.0))  # normalised by sqrt(max * min)
    assert torch.equal(scales_for(x, 0.0), torch.ones(16))


def _fold_all(block, groups, gen):
    for grp in groups:
        d = block.get_submodule(grp["linears"][0]).in_features
        fold_scales(block, grp["prev_name"], grp["linears"], torch.exp(torch.randn(d, generator=gen)))


def test_folding_keeps_the_fp_block_output_with_v_to_o():
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RotaryEmbedding

    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4, vocab_size=10)
    cfg._attn_implementation = "eager"
    layer = Qwen2DecoderLayer(cfg, layer_idx=0).eval()
    with torch.no_grad():
        for n in ("input_layernorm", "post_attention_layernorm"):
            layer.get_submodule(n).weight.uniform_(0.5, 2.0)
        layer.self_attn.v_proj.bias.normal_()  # Qwen2 has q/k/v biases: v's must be divided too
    groups = scale_groups(LLAMA_DECODER, layer)
    assert [g["prev_name"] for g in groups] == ["input_layernorm", "self_attn.v_proj", "post_attention_layernorm", "mlp.up_proj"]
    x = torch.randn(2, 12, 64)
    pe = Qwen2RotaryEmbedding(cfg)(x, torch.arange(12)[None].expand(2, 12))
    with torch.no_grad():
        ref = layer(x, position_embeddings=pe, attention_mask=None)
        folded = copy.deepcopy(layer)
        _fold_all(folded, groups, torch.Generator().manual_seed(1))
        out = folded(x, position_embeddings=pe, attention_mask=None)
    ref, out = (t[0] if isinstance(t, tuple) else t for t in (ref, out))
    assert not torch.equal(folded.mlp.down_proj.weight, layer.mlp.down_proj.weight)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_folding_keeps_the_fp_block_output_on_tiny_gqa_block(tiny_qwen, tiny_calib):
    model = tiny_qwen[0]
    ad = adapter_for(model)
    block = copy.deepcopy(ad.decoder_layers()[1])
    groups = scale_groups(ad.decoder_layout, block)
    assert "self_attn.v_proj" not in [g["prev_name"] for g in groups]  # GQA: v->o skipped
    b = tiny_calib.batches[0]
    with torch.no_grad():
        ref = ad.run_layer(block, b.hidden, b.kwargs)
        _fold_all(block, groups, torch.Generator().manual_seed(2))
        out = ad.run_layer(block, b.hidden, b.kwargs)
    v = b.masks["valid"]
    torch.testing.assert_close(out[v], ref[v], rtol=1e-5, atol=1e-5)


class _OffsetNorm(nn.Module):
    """Gemma-style RMSNorm: multiplies by (1 + weight)."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + self.weight)


def test_folding_refuses_a_norm_with_offset():
    m = nn.Module()
    m.norm, m.fc = _OffsetNorm(8), nn.Linear(8, 4)
    with pytest.raises(ValueError, match="does not scale its output"):
        fold_scales(m, "norm", ["fc"], torch.linspace(0.5, 2, 8))


def test_token_loss_masks_padding_and_normalises():
    torch.manual_seed(0)
    ref, out = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    valid = torch.tensor([[False, True, True, True, True], [True] * 5])
    out[0, 0] = float("nan")  # a padded row may hold anything
    masks = {"valid": valid}
    loss = TokenLoss()
    want = (out - ref)[valid].pow(2).mean()
    assert loss.value(loss.partial(out, ref, masks)) == pytest.approx(float(want), rel=1e-6)
    # accumulating over batches equals one pooled mean
    acc = loss.partial(out[:1], ref[:1], {"valid": valid[:1]}) + loss.partial(out[1:], ref[1:], {"valid": valid[1:]})
    assert loss.value(acc) == pytest.approx(float(want), rel=1e-6)


class _SearchProbe(Method):
    name = "search-probe"
    streams = "fp"
    seen: dict = {}

    def quantize_block(self, block):
        results, inputs = search_block_scales(block, self.spec, alpha_grid(), lambda g: TokenLoss())
        _SearchProbe.seen[block.index] = (results, inputs)
        for n in block.linear_names:
            block.commit(n, quantize_rtn(block.weight(n), self.spec))


def test_search_picks_the_minimum_and_alpha_zero_is_rtn(tiny_qwen, tiny_calib):
    model = copy.deepcopy(tiny_qwen[0])
    spec = QuantSpec(bits=3, group_size=32)
    quantize_model(model, adapter_for(model), tiny_calib, _SearchProbe(spec))
    results, inputs = _SearchProbe.seen[0]
    assert [r.prev_name for r in results] == ["input_layernorm", "post_attention_layernorm", "mlp.up_proj"]
    for r in results:
        assert len(r.history) == 20 and r.loss == min(r.history) and r.loss <= r.history[0]
        assert r.history.index(r.loss) == alpha_grid().index(r.alpha)  # first minimum wins
    # the alpha = 0 loss of the down_proj group is plain RTN's output error on valid tokens
    down = results[-1]
    w = model.model.language_model.layers[0].mlp.down_proj  # already quantized; use the FP copy instead
    fp_w = tiny_qwen[0].model.language_model.layers[0].mlp.down_proj.weight.detach()
    num = den = 0.0
    for b, x in enumerate(inputs["mlp.down_proj"]):
        v = tiny_calib.batches[b].masks["valid"]
        d = (x @ fake_quant_weight(fp_w, spec).T - x @ fp_w.T)[v]
        num, den = num + float(d.pow(2).sum()), den + d.numel()
    assert down.history[0] == pytest.approx(num / den, rel=1e-5)
    assert w.weight.shape == fp_w.shape


def test_clip_search_picks_best_candidate_and_clipped_rtn():
    torch.manual_seed(0)
    spec = QuantSpec(bits=3, group_size=16)
    w = torch.randn(8, 32)
    w[0, 3] = 12.0  # an outlier weight: clipping its group pays off
    x = torch.randn(256, 32)
    mv = clip_search(w, x, spec)
    absmax = w.reshape(8, 2, 16).abs().amax(-1)
    ratios = mv / absmax
    cands = torch.tensor([1 - i / 20 for i in range(10)])
    assert torch.isclose(ratios[..., None], cands).any(-1).all()  # every choice is on the grid
    assert ratios[0, 0] < 1.0
    # brute force for one (row, group)
    best = None
    for c in cands.tolist():
        q = fake_quant_weight(clamp_groups(w, absmax * c, spec), spec)
        e = float(((x[:, :16] @ q[0, :16]) - (x[:, :16] @ w[0, :16])).pow(2).mean())
        best = (e, c) if best is None or e < best[0] else best
    assert ratios[0, 0].item() == pytest.approx(best[1])
    # max_val = absmax: clamping is a no-op and the result is RTN bit for bit
    assert torch.equal(quantize_clipped(w, absmax, spec).qweight, quantize_rtn(w, spec).qweight)


@pytest.mark.parametrize("clip", [True, False])
def test_awq_lowers_block_error_vs_rtn_at_3_bits(tiny_qwen, tiny_calib, clip):
    model = outlier_model(tiny_qwen[0])
    _, r_awq = _quantize(model, tiny_calib, "awq", clip=clip)
    _, r_rtn = _quantize(model, tiny_calib, "rtn")
    e_awq = [b["block_on_fp_input"]["all"] for b in r_awq.diagnostics["blocks"].values()]
    e_rtn = [b["block_on_fp_input"]["all"] for b in r_rtn.diagnostics["blocks"].values()]
    assert all(a < r for a, r in zip(e_awq, e_rtn)), (e_awq, e_rtn)  # every block
    assert sum(e_awq) < 0.6 * sum(e_rtn), (e_awq, e_rtn)
    # diagnostics undo the folded output scale of up_proj: its error stays comparable to RTN's
    for n, e in r_awq.diagnostics["linears"].items():
        assert e["all"] < 2 * r_rtn.diagnostics["linears"][n]["all"], n
    info = r_awq.method_info
    assert set(info["alpha"]) == {"0", "1", "2"}
    assert all(0.0 <= a < 1.0 for layer in info["alpha"].values() for a in layer.values())
    assert bool(info["clip_ratio"]) == clip
    if clip:
        assert set(info["clip_ratio"]["0"]) == {"self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}


def test_awq_is_deterministic(tiny_qwen, tiny_calib):
    _, a = _quantize(tiny_qwen[0], tiny_calib, "awq", bits=4)
    _, b = _quantize(tiny_qwen[0], tiny_calib, "awq", bits=4)
    assert all(torch.equal(a.quantized[n].qweight, b.quantized[n].qweight) for n in a.quantized)


class _AWQProbe(AWQ):
    name = "awq-probe"
    out_scales: dict = {}

    def quantize_block(self, block):
        super().quantize_block(block)
        _AWQProbe.out_scales[block.index] = dict(self.folded_output_scales)


def test_folded_output_scales_are_reported_to_the_diagnostics(tiny_qwen, tiny_calib):
    model = outlier_model(tiny_qwen[0])
    m = _AWQProbe(QuantSpec(bits=3, group_size=32), clip=False)
    quantize_model(model, adapter_for(model), tiny_calib, m)
    for i, sc in _AWQProbe.out_scales.items():
        assert set(sc) == {"mlp.up_proj"}  # GQA: no v->o group, so v_proj keeps its outputs
        s = sc["mlp.up_proj"]
        assert s.shape == (128,) and (m.info["alpha"][str(i)]["mlp.up_proj"] == 0) == bool((s == 1).all())


def test_clip_search_ties_keep_the_unclipped_range():
    w = torch.randn(4, 16)
    mv = clip_search(w, torch.zeros(64, 16), QuantSpec(bits=3, group_size=8))  # every candidate: zero error
    assert torch.equal(mv, w.reshape(4, 2, 8).abs().amax(-1))  # the first (ratio 1.0) wins, as in llm-awq
