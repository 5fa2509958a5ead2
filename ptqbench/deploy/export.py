"""Export a quantized cell to the GPTQ checkpoint layout, and read such a checkpoint back.

`export_gptq(cell, out_dir)` turns `runs/<run>/cells/<cell_id>/model.safetensors` (written by
`packing.save_quantized`) into a directory that GPTQ loaders read (transformers' GPTQ integration through
optimum + GPTQModel, or `GPTQModel.load`): `config.json` with a `quantization_config`, the processor and
tokenizer files, and safetensors with, for each quantized linear `<name>`:

- `<name>.qweight` int32 (in*bits/32, out): the codes of each output column, packed along the input dim
  as a little-endian bit stream of 32-bit words: code i of a column occupies bits [i*bits, (i+1)*bits)
  of the column's stream. For 2/4/8 bits that is 32/bits codes per word, code j of a word at bit j*bits.
  For 3 bits a block of 32 codes fills 3 words and codes 10 and 21 straddle a word boundary (bits 30-31
  of word 0 + bit 0 of word 1; bit 31 of word 1 + bits 0-1 of word 2): GPTQ's interleaved 3-bit layout
  is exactly this dense stream.
- `<name>.qzeros` int32 (n_groups, out*bits/32): the zero points packed the same way along the output
  dim, stored as `zero - 1` (checkpoint_format "gptq", the v1 "zeros minus one" convention: a v1 reader
  adds 1 back). A zero of 0 has no v1 encoding; see `export_gptq`'s `shift_zero`.
- `<name>.scales` fp16 (n_groups, out), `<name>.g_idx` int32 (in,), `<name>.bias` as in the cell.

    W[o, i] = scales[g_idx[i], o] * (q[o, i] - (stored_zero[g_idx[i], o] + 1))

Every other parameter is written as it is in the cell (its dtype kept). `quantization_config` names the
quantized layers the way the loaders select them: `block_name_to_quantize` (the block stacks' common
prefix) and `modules_in_block_to_quantize` (the names inside a block); `desc_act` is true when some
g_idx is not the contiguous arange // group_size; `sym` is true only when every zero is 2^(bits-1).
`checkpoint_format="gptq_v2"` stores zeros as they are (GPTQModel's internal format).

`load_gptq` reads such a directory back into an ordinary transformers model with dequantized nn.Linear
weights, with no GPTQ backend, using the same float32 arithmetic as `QuantizedWeight.dequantize`.
The compressed-tensors format (and weight-activation cells) is `export_ct.py`'s, on this file's machinery.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ptqbench.errors import BadInput
from ptqbench.deploy.packing import pack_bits, unpack_bits
from ptqbench.methods.quant import QuantizedWeight, QuantSpec

GPTQ_BITS = (2, 3, 4, 8)  # what the GPTQ v1 format (and its kernels) can pack
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")  # v1 stores zero - 1, v2 stores zero
CELL_FILE = "model.safetensors"
DEFAULT_SHARD_BYTES = 4 * 2**30
EXPORT_INFO = "ptqbench_export.json"


@dataclass
class ExportSummary:
    out_dir: Path
    model: str
    method: str
    bits: int
    group_size: int  # as written in quantization_config (-1 = per-channel)
    sym: bool
    desc_act: bool
    n_quantized: int
    shifted_groups: int  # (row, group) zero points moved from 0 to 1 (codes + 1), losslessly
    scales_rounded: int = 0  # layers whose scales the cell kept in fp32 and the export rounds to fp16
    export_format: str = "gptq"  # gptq, gptq_v2 or compressed-tensors
    act_bits: int = 16  # activation bits written in the checkpoint's config (16: weights only)
    layout: str = ""  # compressed-tensors only: pack-quantized or int-quantized
    scale_dtype: str = "float16"  # what the scales are stored in
    files: list[str] = field(default_factory=list)
    nbytes: int = 0

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["out_dir"] = str(self.out_dir)
        return d


# ---- the layer format --------------------------------------------------------------------------------

def _pack_unit(bits: int) -> int:
    """Width a packed dimension must be a multiple of: whole words (32 codes for 3-bit)."""
    return 32 if bits == 3 else 32 // bits


def pack_gptq_layer(qw: QuantizedWeight, name: str = "layer", checkpoint_format: str = "gptq",
                    shift_zero: bool = True) -> tuple[dict[str, torch.Tensor], int]:
    """One QuantizedWeight -> GPTQ tensors {qweight, qzeros, scales, g_idx} and the number of
    (row, group) zero points shifted from 0 to 1. Raises BadInput, naming `name`, when the weight does
    not fit the format."""
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise BadInput(f"checkpoint format {checkpoint_format!r} is not accepted; accepted: {', '.join(CHECKPOINT_FORMATS)}")
    bits = qw.spec.bits
    if bits not in GPTQ_BITS:
        raise BadInput(f"layer {name}: {bits}-bit weights cannot be written in the GPTQ format; accepted: bits {', '.join(map(str, GPTQ_BITS))}")
    out_f, in_f = qw.qweight.shape
    n_groups = qw.scale.shape[1]
    unit = _pack_unit(bits)
    for what, n in (("input", in_f), ("output", out_f)):
        if n % unit:
            raise BadInput(f"layer {name}: {what} width {n} cannot be packed as whole 32-bit words at {bits} bits; "
                           f"accepted: widths that are multiples of {unit}")
    if qw.zero.shape != qw.scale.shape or qw.scale.shape[0] != out_f or qw.g_idx.shape != (in_f,):
        raise BadInput(f"layer {name}: inconsistent shapes qweight {tuple(qw.qweight.shape)}, scale "
                       f"{tuple(qw.scale.shape)}, zero {tuple(qw.zero.shape)}, g_idx {tuple(qw.g_idx.shape)}")
    g = qw.g_idx.long()
    if in_f and (int(g.min()) < 0 or int(g.max()) >= n_groups):
        raise BadInput(f"layer {name}: g_idx refers to groups outside 0..{n_groups - 1}")
    zero = qw.zero
    if not bool(((zero == zero.round()) & (zero >= 0) & (zero <= qw.spec.maxq)).all()):
        raise BadInput(f"layer {name}: zero points that are not integers in [0, {qw.spec.maxq}] (the method's own "
                       f"convention) cannot be written in the GPTQ format; accepted: methods on the integer grid")
    q = qw.qweight.to(torch.int64)
    zero = zero.round().to(torch.int64)
    shifted = 0
    if checkpoint_format == "gptq" and bool((zero == 0).any()):
        at_zero = zero == 0  # (out, groups): v1 stores zero - 1, so 0 would read back as 2^bits
        if not shift_zero:
            raise BadInput(f"layer {name}: {int(at_zero.sum())} zero point(s) equal 0, which the GPTQ v1 format "
                           f"(zeros minus one) cannot represent; accepted: shift_zero=True or checkpoint format gptq_v2")
        # (q - 0) * s == ((q + 1) - 1) * s: exact when no code of that (row, group) is already the top code.
        col_group = at_zero[:, g]  # (out, in): this column's group of this row has a zero of 0
        if bool((col_group & (q == qw.spec.maxq)).any()):
            raise BadInput(f"layer {name}: a zero point of 0 in a group that also uses the top code {qw.spec.maxq} "
                           f"has no GPTQ v1 (zeros minus one) encoding; accepted: checkpoint format gptq_v2")
        q = q + col_group.to(torch.int64)
        zero = zero + at_zero.to(torch.int64)
        shifted = int(at_zero.sum())
    s16 = qw.scale.to(torch.float16)
    if not bool(torch.isfinite(s16).all()) or bool(((s16 == 0) & (qw.scale != 0)).any()):
        raise BadInput(f"layer {name}: scales overflow or underflow fp16, which the GPTQ format stores")
    stored_zero = zero - 1 if checkpoint_format == "gptq" else zero
    t = {
        "qweight": pack_bits(q, bits).t().contiguous(),  # (out, in*b/32) -> (in*b/32, out)
        "qzeros": pack_bits(stored_zero.t().contiguous(), bits),  # (groups, out*b/32)
        "scales": qw.scale.t().to(torch.float16).contiguous(),
        "g_idx": qw.g_idx.to(torch.int32).contiguous(),
    }
    return t, shifted


def unpack_gptq_layer(tensors: dict[str, torch.Tensor], bits: int, group_size: int = -1,
                      checkpoint_format: str = "gptq", sym: bool = False) -> QuantizedWeight:
    """GPTQ tensors {qweight, qzeros, scales, g_idx?} -> QuantizedWeight (scales as stored, in float32)."""
    if bits not in GPTQ_BITS:
        raise BadInput(f"bits {bits!r} is not accepted in a GPTQ checkpoint; accepted: {', '.join(map(str, GPTQ_BITS))}")
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise BadInput(f"checkpoint format {checkpoint_format!r} is not accepted; accepted: {', '.join(CHECKPOINT_FORMATS)}")
    qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
    n_groups, out_f = scales.shape
    in_f = qweight.shape[0] * 32 // bits
    if qweight.shape[1] != out_f or qzeros.shape != (n_groups, out_f * bits // 32):
        raise BadInput(f"GPTQ tensors of inconsistent shapes: qweight {tuple(qweight.shape)}, qzeros "
                       f"{tuple(qzeros.shape)}, scales {tuple(scales.shape)} at {bits} bits")
    g_idx = tensors.get("g_idx")
    if g_idx is None:
        gs = in_f if group_size == -1 else group_size
        g_idx = torch.arange(in_f) // gs
    q = unpack_bits(qweight.t().contiguous(), bits, in_f)  # (out, in)
    z = unpack_bits(qzeros, bits, out_f).to(torch.int64)  # (groups, out)
    if checkpoint_format == "gptq":
        z = z + 1  # v1 stores zero - 1
    spec = QuantSpec(bits=bits, group_size=group_size, sym=sym)
    return QuantizedWeight(q, scales.to(torch.float32).t().contiguous(), z.to(torch.float32).t().contiguous(),
                           g_idx.to(torch.int32), spec)


# ---- export ----------------------------------------------------------------------------------------

def cell_file(src) -> Path:
    """The saved model of a cell: `src` is a cell directory runs/<run>/cells/<cell_id> or its CELL_FILE.
    (A cell named by its id in a results store is found by `ptqbench.grid.resolve.resolve_cell`.)"""
    p = Path(src)
    if p.is_dir():
        p = p / CELL_FILE
    if not p.is_file():
        raise BadInput(f"{src} has no saved model ({CELL_FILE}); accepted: a cell directory "
                       f"runs/<run>/cells/<cell_id> of a run with save-model on, or its {CELL_FILE}")
    return p


def _base_config_and_processor(name: str):
    """The base model's config, processor and generation config (or None), without loading a real
    checkpoint's weights."""
    if name == "testbed" or name.startswith("tiny:"):
        from ptqbench.models.sources import load_model

        lm = load_model(name)
        return lm.model.config, lm.processor, getattr(lm.model, "generation_config", None)
    from transformers import AutoConfig, AutoProcessor, GenerationConfig

    from ptqbench.models.sources import ACCEPTED

    if not os.path.isdir(name) and os.environ.get("HF_HUB_OFFLINE") is None:
        os.environ["HF_HUB_OFFLINE"] = "1"
    from ptqbench.models.sources import check_model_source

    check_model_source(name)  # SHA256SUMS verified, pickled weights refused
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=False)
        processor = AutoProcessor.from_pretrained(name, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise BadInput(f"base model {name!r} could not be found ({str(e).splitlines()[0][:160]}); accepted: {ACCEPTED}") from None
    try:
        generation = GenerationConfig.from_pretrained(name, trust_remote_code=False)
    except (OSError, ValueError):
        generation = None
    return config, processor, generation


def _meta_model(config):
    """The model's module tree on the meta device (no memory, no init) to check names against."""
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(config)


def _linear_names(model) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def _shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards, cur, size = [], {}, 0
    for k, t in state.items():
        n = t.numel() * t.element_size()
        if cur and size + n > max_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = t
        size += n
    shards.append(cur)
    return shards


def _write_safetensors(state: dict[str, torch.Tensor], out: Path, metadata: dict, max_bytes: int) -> list[str]:
    from safetensors.torch import save_file

    shards = _shards(state, max_bytes)
    if len(shards) == 1:
        save_file(state, str(out / "model.safetensors"), metadata=metadata)
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for fname, shard in zip(names, shards):
        save_file(shard, str(out / fname), metadata=metadata)
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return names + ["model.safetensors.index.json"]


def _float_dtype(state: dict[str, torch.Tensor]) -> torch.dtype:
    """The dtype of most unquantized float parameters (what the model runs in)."""
    count: dict[torch.dtype, int] = {}
    for t in state.values():
        if t.is_floating_point():
            count[t.dtype] = count.get(t.dtype, 0) + t.numel()
    return max(count, key=count.get) if count else torch.float16


def _quantization_config(bits: int, group_size: int, desc_act: bool, sym: bool, block_name: str,
                         modules_in_block: list[list[str]], meta: dict, checkpoint_format: str) -> dict:
    from ptqbench import __version__

    return {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size,
        "desc_act": desc_act,
        "sym": sym,
        "checkpoint_format": checkpoint_format,
        "pack_dtype": "int32",
        "lm_head": False,
        "block_name_to_quantize": block_name,
        "modules_in_block_to_quantize": modules_in_block,
        "meta": {"quantizer": [f"ptqbench:{__version__}"], "ptqbench": meta},
    }


def cell_act_bits(meta: dict) -> int:
    """Activation bits of a cell from its saved metadata: a weight-activation cell records them in its
    options (its identity); a weight-only cell records none (16)."""
    options = meta.get("options") if isinstance(meta.get("options"), dict) else {}
    act_bits = options.get("act_bits", 16)
    QuantSpec(act_bits=act_bits)  # the one definition of the accepted widths (BadInput otherwise)
    return act_bits


def _load_cell(src: Path, out: Path, model_name: str | None, activations: bool = False):
    """(quantized weights, other parameters, metadata, base model name) of the cell file `src`. A
    weight-activation cell is refused unless the target format describes `activations`."""
    from ptqbench.deploy.packing import load_quantized

    if out.resolve() == src.resolve().parent or out.resolve() in src.resolve().parents:
        raise BadInput(f"output {out} holds the cell being exported; accepted: a directory outside {src.parent}")
    weights, other, meta = load_quantized(src)
    if not weights:
        raise BadInput(f"{src} holds no quantized weight (a full-precision cell?); accepted: a quantized cell")
    act_bits = cell_act_bits(meta)
    if act_bits < 16 and not activations:  # a GPTQ checkpoint has no activation quantizer: it would drop A{act_bits}
        raise BadInput(f"{src} is a weight-activation cell (A{act_bits}), which a GPTQ checkpoint cannot describe; "
                       "accepted: format compressed-tensors, or a weight-only cell (its W*A16 sibling)")
    name = model_name or meta.get("model")
    if not name:
        raise BadInput(f"{src} does not record its base model; accepted: pass model_name (testbed, tiny:<family>, a checkpoint dir)")
    return weights, other, meta, name


@dataclass
class _PackedLayers:
    tensors: dict[str, torch.Tensor]  # "<layer>.<qweight|qzeros|scales|g_idx>" -> tensor
    bits: int
    group_size: int
    desc_act: bool  # some g_idx is not the contiguous arange // group_size
    sym: bool  # every zero is 2^(bits-1)
    shifted: int  # (row, group) zero points moved from 0 to 1
    rounded: int  # layers whose scales are rounded to fp16


def _pack_layers(weights: dict[str, QuantizedWeight], checkpoint_format: str, shift_zero: bool) -> _PackedLayers:
    """Every layer in the GPTQ format; every format check happens here, before the base model is touched."""
    specs = {(qw.spec.bits, qw.spec.group_size) for qw in weights.values()}
    if len(specs) != 1:
        raise BadInput(f"layers of different bits/group sizes {sorted(specs)} cannot share one GPTQ quantization_config; "
                       f"accepted: a cell quantized with one spec")
    bits, group_size = specs.pop()
    out = _PackedLayers({}, bits, group_size, desc_act=False, sym=True, shifted=0, rounded=0)
    for lname, qw in weights.items():
        t, s = pack_gptq_layer(qw, lname, checkpoint_format, shift_zero)
        out.shifted += s
        out.rounded += not torch.equal(qw.scale.to(torch.float16).to(torch.float32), qw.scale.to(torch.float32))
        in_f = qw.qweight.shape[1]
        gs = in_f if group_size == -1 else group_size
        out.desc_act |= not torch.equal(qw.g_idx.long(), torch.arange(in_f) // gs)
        out.sym &= s == 0 and bool((qw.zero == 2 ** (bits - 1)).all())
        out.tensors.update({f"{lname}.{k}": v for k, v in t.items()})
    return out


def _check_against_base(model, name: str, src: Path, weights: dict, other: dict, packed: dict) -> None:
    """The cell's layers and parameters are exactly those of the base model `model` (meta device)."""
    linears = _linear_names(model)
    state_names = set(model.state_dict())
    missing = sorted(n for n in weights if n not in linears)
    if missing:
        raise BadInput(f"quantized layer(s) {', '.join(missing[:5])} are not linear layers of {name!r}; "
                       f"accepted: the base model the cell was quantized from (pass model_name)")
    for k in other:
        if k in packed:
            raise BadInput(f"parameter {k!r} is both quantized and unquantized in {src}")
    expected = {n for n in state_names if n.removesuffix(".weight") not in weights}
    absent = sorted(expected - set(other))
    unknown = sorted(set(other) - state_names)
    if absent or unknown:
        raise BadInput(f"{src} does not match base model {name!r}: "
                       + (f"missing {', '.join(absent[:5])}" if absent else "")
                       + ("; " if absent and unknown else "") + (f"unexpected {', '.join(unknown[:5])}" if unknown else "")
                       + "; accepted: the base model the cell was quantized from (pass model_name)")


def _config_dict(config, model, weights: dict, other: dict, meta: dict, p: _PackedLayers, checkpoint_format: str) -> dict:
    """config.json: the base model's config with the quantization_config the GPTQ loaders read."""
    # Which linears a GPTQ loader must turn into quantized ones: per block stack, the names inside a block.
    block_name, modules_in_block = _block_layout(model, list(weights))
    qmeta = {k: meta.get(k) for k in ("model", "method", "bits", "options", "group_size", "sym", "calib_hash")}
    qconfig = _quantization_config(p.bits, p.group_size, p.desc_act, p.sym, block_name, modules_in_block, qmeta,
                                   checkpoint_format)
    cfg_dict = config.to_dict()
    cfg_dict["quantization_config"] = qconfig
    cfg_dict["dtype"] = str(_float_dtype(other)).removeprefix("torch.")
    cfg_dict.pop("torch_dtype", None)
    return cfg_dict


def _write_export(out: Path, state: dict, cfg_dict: dict, processor, generation, summary: ExportSummary,
                  src: Path, meta: dict, max_shard_bytes: int) -> None:
    """Write everything into a temporary sibling of `out`, then rename it into place."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    except OSError as e:  # checked up front; this is a race with another writer (or a read-only mount)
        raise BadInput(f"output {str(out)!r} cannot be created ({e.strerror or e}); accepted: {_OUT_ACCEPTED}") from None
    try:
        summary.files = _write_safetensors(state, tmp, {"format": "pt", "ptqbench.export": summary.export_format},
                                           max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(cfg_dict, indent=2, sort_keys=True, default=str) + "\n")
        processor.save_pretrained(str(tmp))
        if generation is not None:
            generation.save_pretrained(str(tmp))
        (tmp / EXPORT_INFO).write_text(json.dumps(dict(summary.to_dict(), source=str(src), metadata=meta),
                                                  indent=2, sort_keys=True, default=str) + "\n")
        _default_permissions(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def export_gptq(cell_path, out_dir, model_name: str | None = None, *, checkpoint_format: str = "gptq",
                shift_zero: bool = True, overwrite: bool = False,
                max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> ExportSummary:
    """Write the quantized cell `cell_path` (a cell directory or its model.safetensors; a cell id is
    resolved to it by `ptqbench.grid.resolve.resolve_cell`) as a GPTQ checkpoint directory `out_dir`.

    `model_name` (default: the model recorded in the cell) names the base model whose config and
    processor go with the weights: testbed, tiny:<family>, or a checkpoint directory.

    Zero points: v1 ("gptq") stores zero - 1, so a zero of 0 cannot be written. With `shift_zero` (the
    default) such a (row, group) is rewritten as zero 1 and codes + 1, which dequantizes to exactly the
    same weights; it is refused (BadInput naming the layer) when that group already uses the top code,
    or always when `shift_zero` is False. checkpoint_format="gptq_v2" stores zeros as they are.

    Refused with BadInput (nothing written): bits other than 2/3/4/8, zero points that are not integers
    on the grid (a method's own convention), layers whose widths do not fill whole 32-bit words, layers of
    different bits or group sizes, quantized names the base model does not have, an `out_dir` that exists
    and is not empty (unless `overwrite`). The directory appears complete or not at all."""
    src = cell_file(cell_path)
    out = check_output_dir(out_dir, overwrite)
    weights, other, meta, name = _load_cell(src, out, model_name)
    p = _pack_layers(weights, checkpoint_format, shift_zero)

    config, processor, generation = _base_config_and_processor(name)
    config = _copy_config(config)
    model = _meta_model(config)
    _check_against_base(model, name, src, weights, other, p.tensors)
    cfg_dict = _config_dict(config, model, weights, other, meta, p, checkpoint_format)

    state = dict(p.tensors)
    state.update({k: t.detach().contiguous() for k, t in other.items()})
    state = _untie(state)
    summary = ExportSummary(out, name, str(meta.get("method")), p.bits, p.group_size, p.sym, p.desc_act, len(weights),
                            p.shifted, p.rounded, export_format=checkpoint_format)
    _write_export(out, state, cfg_dict, processor, generation, summary, src, meta, max_shard_bytes)
    summary.files = sorted(f.name for f in out.iterdir())
    summary.nbytes = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    return summary


_OUT_ACCEPTED = "a new or empty directory in a writable place (a non-empty one with overwrite)"


def check_output_dir(out_dir, overwrite: bool = False) -> Path:
    """Validate an export target before any work, writing nothing: BadInput (one line) when it is an
    existing file, a non-empty directory (without `overwrite`), under a file, or in a place where no
    directory can be created. The place is probed by creating and removing an empty directory in the
    nearest existing folder, which is where the export puts its temporary directory and its parents."""
    out = Path(out_dir)
    if not str(out_dir).strip():
        raise BadInput(f"output {str(out_dir)!r} is empty; accepted: {_OUT_ACCEPTED}")
    try:
        if out.exists():
            if not out.is_dir():
                raise BadInput(f"output {str(out)!r} is an existing file, not a directory; accepted: {_OUT_ACCEPTED}")
            if any(out.iterdir()) and not overwrite:
                raise BadInput(f"output {str(out)!r} exists and is not an empty directory; accepted: a new or empty "
                               "directory, or overwrite")
        elif out.is_symlink():
            raise BadInput(f"output {str(out)!r} is a broken symbolic link; accepted: {_OUT_ACCEPTED}")
        place = out.absolute().parent
        while not place.exists():
            if place.is_symlink():
                raise BadInput(f"output {str(out)!r} is under {str(place)!r}, a broken symbolic link; accepted: {_OUT_ACCEPTED}")
            place = place.parent
        if not place.is_dir():
            raise BadInput(f"output {str(out)!r} is under {str(place)!r}, which is a file; accepted: {_OUT_ACCEPTED}")
    except OSError as e:  # e.g. a folder on the way that cannot be searched
        raise BadInput(f"output {str(out)!r} cannot be checked ({e.strerror or e}); accepted: {_OUT_ACCEPTED}") from None
    try:
        os.rmdir(tempfile.mkdtemp(dir=place, prefix=".ptqbench-probe-"))
    except OSError as e:
        raise BadInput(f"output {str(out)!r} cannot be written: no directory can be created in {str(place)!r} "
                       f"({e.strerror or e}); accepted: {_OUT_ACCEPTED}") from None
    return out


def _default_permissions(d: Path) -> None:
    """mkdtemp makes a 0700 directory (and safetensors may write 0600 files): give the export the
    permissions an ordinary mkdir/open would."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(d, 0o777 & ~umask)
    for p in d.iterdir():
        os.chmod(p, 0o666 & ~umask)


def _copy_config(config):
    import copy

    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    return config


def _untie(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing storage (tied embeddings): give each its own."""
    seen, out = set(), {}
    for k, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        out[k] = t.clone() if key in seen else t
        seen.add(key)
    return out


def _block_layout(model, names: list[str]) -> tuple[str, list[list[str]]]:
    """`block_name_to_quantize` and `modules_in_block_to_quantize` for the loaders: the dotted prefix
    shared by the block stacks holding the quantized layers ("model.language_model.layers" for a
    decoder-only cell) and the names inside a block that are quantized. transformers/optimum turn into
    quantized layers exactly the nn.Linear whose name starts with the prefix and ends with one of those
    names; a cell whose quantized set that rule cannot single out is refused."""
    lists = {n for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList)}
    stacks: list[str] = []
    inner: list[str] = []
    for n in names:
        parts = n.split(".")
        for i in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:i])
            if prefix in lists and parts[i].isdigit():
                stacks += [prefix] if prefix not in stacks else []
                rest = ".".join(parts[i + 1:])
                inner += [rest] if rest not in inner else []
                break
        else:
            raise BadInput(f"quantized layer {n} is outside any block stack; the GPTQ format quantizes blocks only")
    common = stacks[0].split(".")
    for p in stacks[1:]:
        q = p.split(".")
        k = 0
        while k < min(len(common), len(q)) and common[k] == q[k]:
            k += 1
        common = common[:k]
    block_name = ".".join(common)
    selected = {n for n, m in model.named_modules()
                if (type(m) is torch.nn.Linear or isinstance(m, torch.nn.Conv2d)) and n.startswith(block_name)
                and any(n.endswith(k) for k in inner)}
    if selected != set(names):
        extra, lacking = sorted(selected - set(names)), sorted(set(names) - selected)
        raise BadInput(f"the GPTQ loaders' layer selection (block {block_name!r}, modules {inner}) cannot express this "
                       f"cell's quantized layers (it would also take {extra[:3]}, and miss {lacking[:3]}); accepted: "
                       f"cells that quantize the same layers in every block")
    return block_name, [inner]


# ---- load ------------------------------------------------------------------------------------------

def _read_state(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = d / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (d / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise BadInput(f"{d} holds no model.safetensors; accepted: a directory written by export_gptq")
    state = {}
    for f in files:
        state.update(load_file(str(d / f)))
    return state


def read_gptq_config(out_dir) -> tuple[dict, dict]:
    """(config.json without quantization_config, quantization_config) of a GPTQ checkpoint directory."""
    d = Path(out_dir)
    try:
        cfg = json.loads((d / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise BadInput(f"cannot read {d / 'config.json'}: {e}; accepted: a directory written by export_gptq") from None
    qc = cfg.pop("quantization_config", None)
    if not isinstance(qc, dict) or qc.get("quant_method") != "gptq":
        raise BadInput(f"{d} is not a GPTQ checkpoint (quantization_config.quant_method "
                       f"{(qc or {}).get('quant_method')!r}); accepted: gptq")
    return cfg, qc


def load_gptq_weights(out_dir) -> tuple[dict[str, QuantizedWeight], dict[str, torch.Tensor], dict]:
    """The checkpoint's quantized layers as QuantizedWeight (codes, zeros, fp16 scales as float32,
    g_idx), the other tensors as stored, and the quantization_config."""
    _, qc = read_gptq_config(out_dir)
    bits, group_size = int(qc["bits"]), int(qc.get("group_size", -1))
    fmt = qc.get("checkpoint_format", "gptq")
    state = _read_state(Path(out_dir))
    weights = {}
    for k in [k for k in state if k.endswith(".qweight")]:
        base = k.removesuffix(".qweight")
        fields = {f: state.pop(f"{base}.{f}") for f in ("qweight", "qzeros", "scales", "g_idx") if f"{base}.{f}" in state}
        if len(fields) < 3 or "qzeros" not in fields or "scales" not in fields:
            raise BadInput(f"quantized layer {base} lacks qzeros/scales in {out_dir}")
        weights[base] = unpack_gptq_layer(fields, bits, group_size, fmt, bool(qc.get("sym", False)))
    return weights, state, qc


def load_gptq(out_dir, dtype: torch.dtype | None = None):
    """A GPTQ checkpoint directory -> an ordinary transformers model (eval mode, CPU) whose quantized
    linears hold the dequantized weights (q - zero[g_idx]) * scale[g_idx], computed in float32 from the
    fp16 scales then cast to `dtype` (default: the dtype the checkpoint's other parameters have)."""
    from transformers import AutoConfig, AutoModelForImageTextToText
    from transformers.initialization import no_init_weights

    d = Path(out_dir)
    cfg, _ = read_gptq_config(d)
    weights, state, _ = load_gptq_weights(d)
    dtype = dtype or _float_dtype(state)
    cfg.pop("dtype", None)
    cfg.pop("torch_dtype", None)
    model_type = cfg.pop("model_type", None)
    if model_type is None:
        raise BadInput(f"{d / 'config.json'} has no model_type")
    config = AutoConfig.for_model(model_type, **cfg)
    with no_init_weights():
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    for name, qw in weights.items():
        state[f"{name}.weight"] = qw.dequantize()
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}
    result = model.load_state_dict(state, strict=False)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded_ptrs = {params[k].data_ptr() for k in state if k in params}
    missing = [k for k in result.missing_keys if k not in params or params[k].data_ptr() not in loaded_ptrs]
    if missing or result.unexpected_keys:
        raise BadInput(f"{d} does not match its config: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}")
    return model.eval()
