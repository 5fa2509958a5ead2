"""Export a quantized cell in the compressed-tensors format (vLLM, llm-compressor, transformers).

`export_compressed_tensors(cell, out_dir)` writes the layout compressed-tensors 0.20 reads
(`quant_method: "compressed-tensors"`, `quantization_status: "compressed"`): `config.json` with one
config group targeting `Linear`, every full-precision linear (lm_head, the vision tower unless it was
quantized, the merger) named in `ignore`, and for each quantized linear `<name>`:

- weight-only cells (W*A16), format "pack-quantized": `weight_packed` int32 (out, ceil(in*bits/32)), the
  codes of each output row as one dense little-endian bit stream (code i at bits [i*bits, (i+1)*bits),
  straddling words at 3/5/6/7 bits); `weight_shape` int64 [out, in].
- weight-activation cells (W*A8 ...), format "int-quantized": `weight` int8 (out, in), the signed codes.
  Their config adds `input_activations`: per-token dynamic symmetric int of the cell's activation bits, or per-tensor
  static with each linear's calibrated `input_scale` (`--act-scheme tensor`).
- `weight_scale` (out, n_groups), and `weight_zero_point` for asymmetric weights only: int8 (out, n_groups)
  in int-quantized, packed like the codes along the output dim in pack-quantized (ceil(out*bits/32), n_groups).

compressed-tensors keeps codes signed: with half = 2^(bits-1), a stored code is q - half and a stored zero
point zero - half, so W = scale * (q_signed - zp_signed) = scale * (q - zero), the cell's own arithmetic.
Packing adds half back, so the packed words hold exactly ptqbench's unsigned codes and zeros. "symmetric"
is written when every zero equals half (no zero point is stored then). Scales are stored in fp16 when the
cell's scales are all fp16 values (what `bench run` saves), else in fp32: nothing is rounded.

Refused before anything is written (BadInput, one line): act-order cells (a non-contiguous g_idx:
compressed-tensors 0.20 removed actorder "group" and stores no g_idx), zero points off the integer grid,
layers of different bits or group sizes, and everything `export_gptq` refuses about sources and targets.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ptqbench.deploy.export import (
    DEFAULT_SHARD_BYTES,
    ExportSummary,
    _base_config_and_processor,
    _check_against_base,
    _copy_config,
    _float_dtype,
    _linear_names,
    _load_cell,
    _meta_model,
    _untie,
    _write_export,
    cell_act_bits,
    cell_file,
    check_output_dir,
    export_gptq,
)
from ptqbench.deploy.packing import pack_bits, read_metadata
from ptqbench.errors import BadInput, one_of
from ptqbench.methods.quant import QuantizedWeight

CT_VERSION = "0.20.0"  # the compressed-tensors release whose layout this writes (and the tests read back with)
WEIGHT_ONLY_LAYOUT = "pack-quantized"
WEIGHT_ACTIVATION_LAYOUT = "int-quantized"
EXPORT_FORMATS = ("gptq", "gptq_v2", "compressed-tensors")  # what `bench export --format` accepts


@dataclass
class _CtLayers:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # "<layer>.<weight_packed|...>" -> tensor
    bits: int = 0
    group_size: int = -1
    sym: bool = True  # every zero is 2^(bits-1): no zero point stored
    scale_dtype: torch.dtype = torch.float16


def _check_layer(qw: QuantizedWeight, name: str, group_size: int) -> None:
    """What compressed-tensors cannot describe about one layer, as a one-line BadInput naming it."""
    out_f, in_f = qw.qweight.shape
    if qw.zero.shape != qw.scale.shape or qw.scale.shape[0] != out_f or qw.g_idx.shape != (in_f,):
        raise BadInput(f"layer {name}: inconsistent shapes qweight {tuple(qw.qweight.shape)}, scale "
                       f"{tuple(qw.scale.shape)}, zero {tuple(qw.zero.shape)}, g_idx {tuple(qw.g_idx.shape)}")
    gs = in_f if group_size == -1 else group_size
    if in_f % gs or not torch.equal(qw.g_idx.long(), torch.arange(in_f) // gs):
        raise BadInput(f"layer {name}: an act-order g_idx (columns not in contiguous groups of {gs}) cannot be written "
                       f"in compressed-tensors {CT_VERSION}, which stores no g_idx; accepted: a cell without act-order "
                       f"(e.g. -o gptq.act_order=false), or format gptq")
    z = qw.zero
    if not bool(((z == z.round()) & (z >= 0) & (z <= qw.spec.maxq)).all()):
        raise BadInput(f"layer {name}: zero points that are not integers in [0, {qw.spec.maxq}] (the method's own "
                       f"convention) cannot be written in compressed-tensors; accepted: methods on the integer grid")


def pack_ct_layer(qw: QuantizedWeight, layout: str, sym: bool, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One checked QuantizedWeight -> its compressed-tensors tensors (local names: weight_packed, ...)."""
    bits = qw.spec.bits
    half = 2 ** (bits - 1)
    q = qw.qweight.to(torch.int64)
    zero = qw.zero.round().to(torch.int64)
    if layout == WEIGHT_ONLY_LAYOUT:
        t = {"weight_packed": pack_bits(q, bits), "weight_shape": torch.tensor(list(q.shape), dtype=torch.int64)}
        if not sym:  # packed along the output dim: pack the (groups, out) transpose row by row, then transpose back
            t["weight_zero_point"] = pack_bits(zero.t().contiguous(), bits).t().contiguous()
    elif layout == WEIGHT_ACTIVATION_LAYOUT:
        t = {"weight": (q - half).to(torch.int8)}
        if not sym:
            t["weight_zero_point"] = (zero - half).to(torch.int8)
    else:
        raise BadInput(f"compressed-tensors layout {layout!r} is not accepted; accepted: "
                       f"{WEIGHT_ONLY_LAYOUT}, {WEIGHT_ACTIVATION_LAYOUT}")
    t["weight_scale"] = qw.scale.to(scale_dtype).contiguous()
    if "act_scale" in qw.extras:  # a static per-tensor activation scale, fp32 as calibrated
        t["input_scale"] = qw.extras["act_scale"].to(torch.float32).reshape(1).contiguous()
    return t


def pack_ct_layers(weights: dict[str, QuantizedWeight], layout: str) -> _CtLayers:
    """Every layer in the compressed-tensors layout; every check runs before the base model is touched."""
    specs = {(qw.spec.bits, qw.spec.group_size) for qw in weights.values()}
    if len(specs) != 1:
        raise BadInput(f"layers of different bits/group sizes {sorted(specs)} cannot share one compressed-tensors "
                       f"config group; accepted: a cell quantized with one spec")
    p = _CtLayers()
    p.bits, p.group_size = specs.pop()
    for name, qw in weights.items():
        _check_layer(qw, name, p.group_size)
        p.sym &= bool((qw.zero == 2 ** (p.bits - 1)).all())
        if not torch.equal(qw.scale.to(torch.float16).to(torch.float32), qw.scale.to(torch.float32)):
            p.scale_dtype = torch.float32  # a scale that fp16 would round: keep all of them exact
    for name, qw in weights.items():
        p.tensors.update({f"{name}.{k}": v for k, v in pack_ct_layer(qw, layout, p.sym, p.scale_dtype).items()})
    return p


def ct_quantization_config(p: _CtLayers, layout: str, act_bits: int, ignore: list[str], meta: dict,
                           act_scheme: str = "token") -> dict:
    """config.json's quantization_config, field for field as compressed-tensors 0.20 writes it."""
    from ptqbench import __version__

    weights = {"dynamic": False, "group_size": None if p.group_size == -1 else p.group_size, "num_bits": p.bits,
               "strategy": "channel" if p.group_size == -1 else "group", "symmetric": p.sym, "type": "int"}
    # ptqbench's activation quantizers: per token, dynamic, symmetric (quant.quantize_activation); or per
    # tensor, static, symmetric with each linear's calibrated `input_scale` (quant.quantize_activation_static)
    static = act_scheme == "tensor"
    acts = None if act_bits >= 16 else {"dynamic": not static, "group_size": None, "num_bits": act_bits,
                                        "strategy": "tensor" if static else "token", "symmetric": True, "type": "int"}
    group = {"format": layout, "input_activations": acts, "output_activations": None, "targets": ["Linear"],
             "weights": weights}
    return {
        "config_groups": {"group_0": group},
        "format": layout,
        "global_compression_ratio": None,
        "ignore": ignore,
        "kv_cache_scheme": None,
        "moe_sparsity_config": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": CT_VERSION,
        "ptqbench": {"quantizer": f"ptqbench:{__version__}", **meta},  # provenance; compressed-tensors ignores it
    }


def export_compressed_tensors(cell_path, out_dir, model_name: str | None = None, *, overwrite: bool = False,
                              max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> ExportSummary:
    """Write the quantized cell `cell_path` (a cell directory or its model.safetensors) as a
    compressed-tensors checkpoint directory `out_dir`: pack-quantized for a weight-only cell,
    int-quantized with per-token dynamic (or per-tensor static, `input_scale`) activations for a
    weight-activation cell. `model_name` as in
    `export_gptq`. The directory appears complete or not at all."""
    src = cell_file(cell_path)
    out = check_output_dir(out_dir, overwrite)
    weights, other, meta, name = _load_cell(src, out, model_name, activations=True)
    act_bits = cell_act_bits(meta)
    scheme = (meta.get("options") or {}).get("act_scheme", "token") if isinstance(meta.get("options"), dict) else "token"
    if act_bits < 16 and scheme == "tensor":
        lacking = [n for n, qw in weights.items() if "act_scale" not in qw.extras]
        if lacking:
            raise BadInput(f"{src} is a static (per-tensor) activation cell but {lacking[0]} has no calibrated "
                           "act_scale; accepted: a cell saved by bench run --act-scheme tensor")
    layout = WEIGHT_ONLY_LAYOUT if act_bits >= 16 else WEIGHT_ACTIVATION_LAYOUT
    p = pack_ct_layers(weights, layout)

    config, processor, generation = _base_config_and_processor(name)
    config = _copy_config(config)
    model = _meta_model(config)
    _check_against_base(model, name, src, weights, other, p.tensors)
    linears = _linear_names(model)
    ignore = [n for n, _ in model.named_modules() if n in linears and n not in weights]  # model order
    qmeta = {k: meta.get(k) for k in ("model", "method", "bits", "options", "group_size", "sym", "calib_hash")}
    cfg_dict = config.to_dict()
    cfg_dict["quantization_config"] = ct_quantization_config(p, layout, act_bits, ignore, qmeta,
                                                             scheme if act_bits < 16 else "token")
    cfg_dict["dtype"] = str(_float_dtype(other)).removeprefix("torch.")
    cfg_dict.pop("torch_dtype", None)

    state = dict(p.tensors)
    state.update({k: t.detach().contiguous() for k, t in other.items()})
    summary = ExportSummary(out, name, str(meta.get("method")), p.bits, p.group_size, p.sym, False, len(weights), 0,
                            export_format="compressed-tensors", act_bits=act_bits, layout=layout,
                            scale_dtype=str(p.scale_dtype).removeprefix("torch."))
    _write_export(out, _untie(state), cfg_dict, processor, generation, summary, src, meta, max_shard_bytes)
    summary.files = sorted(f.name for f in out.iterdir())
    summary.nbytes = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    return summary


def export_cell(cell_path, out_dir, model_name: str | None = None, *, export_format: str | None = None,
                shift_zero: bool = True, overwrite: bool = False,
                max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> ExportSummary:
    """`bench export`: the cell in `export_format` (one of EXPORT_FORMATS). None picks by the cell:
    compressed-tensors for a weight-activation cell (the only format here that describes its activation
    quantizer), gptq for a weight-only one. `shift_zero` applies to gptq (see `export_gptq`)."""
    if export_format is not None and export_format not in EXPORT_FORMATS:
        raise one_of("export format", export_format, EXPORT_FORMATS)
    src = cell_file(cell_path)
    check_output_dir(out_dir, overwrite)  # before the cell is read, as in the exporters themselves
    if export_format is None:
        export_format = "compressed-tensors" if cell_act_bits(read_metadata(src)) < 16 else "gptq"
    if export_format == "compressed-tensors":
        return export_compressed_tensors(src, out_dir, model_name, overwrite=overwrite, max_shard_bytes=max_shard_bytes)
    return export_gptq(src, out_dir, model_name, checkpoint_format=export_format, shift_zero=shift_zero,
                       overwrite=overwrite, max_shard_bytes=max_shard_bytes)
