"""Real packed low-bit storage for QuantizedWeight, so model size is measured, not computed.

Layout (per output row, like a bit stream): code i of a row occupies bits [i*b, (i+1)*b) of the row's
stream of little-endian int32 words, so a code may straddle two words (3, 5, 6, 7 bits) exactly as in
GPTQ's 3-bit layout. The stream is dense: a row of n codes takes ceil(n*b/32) words. Zeros are packed
the same way (they are integers in [0, 2^b-1] on the shared grid); scales are stored as fp16 (what a
deployed kernel reads), so unpack gives back the codes, zeros and g_idx bit-exactly and the scales
exactly as stored (pass scale_dtype=torch.float32 to keep them bit-exact too).

Tensors of one packed weight: qweight int32 (out, words), scales (out, groups), qzeros int32 (out,
zwords) -- or zeros float32 when some zero is not an in-range integer --, g_idx int32 (in,), and
qmeta int32 [bits, group_size, sym, grid, in_features, n_groups]; and for a per-tensor static
weight-activation layer act_scale, its calibrated 0-d fp32 input scale (QuantizedWeight.extras["act_scale"]).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import torch

from ptqbench.errors import BadInput
from ptqbench.methods.quant import GRIDS, QuantizedWeight, QuantSpec

FORMAT = "ptqbench-packed-v1"
FIELDS = ("qweight", "scales", "qzeros", "zeros", "g_idx", "qmeta", "act_scale")


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(rows, n) integer codes in [0, 2^bits) -> (rows, ceil(n*bits/32)) int32 words, densely."""
    rows, n = codes.shape
    n32 = -(-n // 32) * 32  # 32 codes of b bits fill exactly b words: work in such blocks
    c = torch.zeros(rows, n32, dtype=torch.int64, device=codes.device)
    c[:, :n] = codes.to(torch.int64)
    c = c.view(rows, n32 // 32, 32)
    words = torch.zeros(rows, n32 // 32, bits + 1, dtype=torch.int64, device=codes.device)
    for j in range(32):  # 32 vectorized steps, whatever the matrix size
        shifted = c[:, :, j] << ((j * bits) % 32)
        w = (j * bits) // 32
        words[:, :, w] += shifted & 0xFFFFFFFF  # bit ranges never overlap, so + is |
        words[:, :, w + 1] += shifted >> 32  # the part that straddles into the next word
    stream = words[:, :, :bits].reshape(rows, -1)[:, : math.ceil(n * bits / 32)]
    return torch.where(stream >= 2**31, stream - 2**32, stream).to(torch.int32)  # two's complement wrap


def unpack_bits(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of pack_bits: (rows, words) int32 -> (rows, n) uint8 codes."""
    rows = words.shape[0]
    n32 = -(-n // 32) * 32
    w = torch.zeros(rows, n32 // 32 * bits, dtype=torch.int64, device=words.device)
    w[:, : words.shape[1]] = words.to(torch.int64) & 0xFFFFFFFF
    blocks = w.view(rows, n32 // 32, bits)
    blocks = torch.cat([blocks, torch.zeros_like(blocks[:, :, :1])], dim=2)  # room for a straddle
    mask = (1 << bits) - 1
    out = torch.empty(rows, n32 // 32, 32, dtype=torch.int64, device=words.device)
    for j in range(32):
        wi, off = (j * bits) // 32, (j * bits) % 32
        out[:, :, j] = ((blocks[:, :, wi] >> off) | (blocks[:, :, wi + 1] << (32 - off))) & mask
    return out.view(rows, n32)[:, :n].to(torch.uint8)


def pack(qw: QuantizedWeight, scale_dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    spec = qw.spec
    out_f, in_f = qw.qweight.shape
    n_groups = qw.scale.shape[1]
    if qw.g_idx.shape != (in_f,) or qw.zero.shape != qw.scale.shape or qw.scale.shape[0] != out_f:
        raise BadInput(
            f"inconsistent quantized weight: qweight {tuple(qw.qweight.shape)}, scale {tuple(qw.scale.shape)}, "
            f"zero {tuple(qw.zero.shape)}, g_idx {tuple(qw.g_idx.shape)}"
        )
    if int(qw.qweight.min()) < 0 or int(qw.qweight.max()) > spec.maxq:
        raise BadInput(f"codes outside [0, {spec.maxq}] for {spec.bits}-bit packing")
    t = {
        "qweight": pack_bits(qw.qweight, spec.bits),
        "scales": qw.scale.to(scale_dtype).contiguous(),
        "g_idx": qw.g_idx.to(torch.int32).contiguous(),
        "qmeta": torch.tensor(
            [spec.bits, spec.group_size, int(spec.sym), GRIDS.index(spec.grid), in_f, n_groups], dtype=torch.int32
        ),
    }
    z = qw.zero
    if bool(((z == z.round()) & (z >= 0) & (z <= spec.maxq)).all()):
        t["qzeros"] = pack_bits(z.round().to(torch.int64), spec.bits)
    else:  # off-grid zeros (a method's own convention): keep them exact rather than wrong
        t["zeros"] = z.to(torch.float32).contiguous()
    if "act_scale" in qw.extras:  # a static activation scale is part of the deployed layer: always fp32
        t["act_scale"] = qw.extras["act_scale"].detach().to("cpu", torch.float32).reshape(()).contiguous()
    return t


def unpack(tensors: dict[str, torch.Tensor]) -> QuantizedWeight:
    missing = [k for k in ("qweight", "scales", "g_idx", "qmeta") if k not in tensors]
    if missing or ("qzeros" not in tensors and "zeros" not in tensors):
        raise BadInput(f"packed weight lacks {', '.join(missing) or 'qzeros/zeros'}; accepted: the output of pack()")
    bits, group_size, sym, grid, in_f, n_groups = (int(v) for v in tensors["qmeta"].tolist())
    spec = QuantSpec(bits=bits, group_size=group_size, sym=bool(sym), grid=GRIDS[grid])
    q = unpack_bits(tensors["qweight"], bits, in_f)
    if "qzeros" in tensors:
        zero = unpack_bits(tensors["qzeros"], bits, n_groups).to(torch.float32)
    else:
        zero = tensors["zeros"].to(torch.float32)
    extras = {"act_scale": tensors["act_scale"].to(torch.float32)} if "act_scale" in tensors else {}
    return QuantizedWeight(q, tensors["scales"].to(torch.float32), zero, tensors["g_idx"].to(torch.int32), spec, extras)


def packed_nbytes(tensors: dict[str, torch.Tensor]) -> int:
    """Bytes the tensors really occupy (elements x element size), metadata tensors included."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def save_quantized(path, named_weights: dict[str, QuantizedWeight], other_state: dict[str, torch.Tensor],
                   metadata: dict | None = None, scale_dtype: torch.dtype = torch.float16) -> int:  # fmt: skip
    """Write one safetensors file: every quantized weight packed as `<name>.<field>`, the other
    parameters as they are. Written to a temporary file then renamed, so a crash never leaves half a
    file. Returns the file size in bytes. Of QuantizedWeight.extras only a static activation scale ("act_scale") is saved."""
    from safetensors.torch import save_file

    state, seen = {}, set()
    for name, qw in named_weights.items():
        for field, t in pack(qw, scale_dtype).items():
            state[f"{name}.{field}"] = t
    for name, t in other_state.items():
        if name in state or name in named_weights:
            raise BadInput(f"parameter {name!r} is both quantized and unquantized; accepted: distinct names")
        t = t.detach().contiguous()
        if (t.untyped_storage().data_ptr(), t.storage_offset()) in seen:
            t = t.clone()  # tied weights (lm_head = embed_tokens) share storage; safetensors refuses that
        seen.add((t.untyped_storage().data_ptr(), t.storage_offset()))
        state[name] = t
    meta = {
        "format": "pt",
        "ptqbench.format": FORMAT,
        "ptqbench.quantized": json.dumps(sorted(named_weights)),
        "ptqbench.metadata": json.dumps(metadata or {}, sort_keys=True, default=str),
    }
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(state, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path.stat().st_size


def read_metadata(path) -> dict:
    """The metadata save_quantized recorded (model, method, bits, options, ...), reading only the file's header."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for missing or damaged files
        raise BadInput(f"cannot read packed model {path}: {e}") from None
    if meta.get("ptqbench.format") != FORMAT:
        raise BadInput(f"{path} is not a ptqbench packed model (format {meta.get('ptqbench.format')!r}; accepted: {FORMAT})")
    return json.loads(meta["ptqbench.metadata"])


def load_quantized(path) -> tuple[dict[str, QuantizedWeight], dict[str, torch.Tensor], dict]:
    """Read a file written by save_quantized: (quantized weights, other parameters, metadata)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("ptqbench.format") != FORMAT:
                raise BadInput(f"{path} is not a ptqbench packed model (format {meta.get('ptqbench.format')!r}; accepted: {FORMAT})")
            state = {k: f.get_tensor(k) for k in f.keys()}
    except BadInput:
        raise
    except Exception as e:  # safetensors raises its own error types for missing or damaged files
        raise BadInput(f"cannot read packed model {path}: {e}") from None
    weights = {}
    for name in json.loads(meta["ptqbench.quantized"]):
        fields = {f: state.pop(f"{name}.{f}") for f in FIELDS if f"{name}.{f}" in state}
        weights[name] = unpack(fields)
    return weights, state, json.loads(meta["ptqbench.metadata"])
