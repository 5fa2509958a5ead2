"""The testbed's vision tower: DCT initialisation, the auxiliary per-token cell loss that stands in for
a pre-trained encoder's alignment, the tower-alone pre-training stage, and the frozen tower's features."""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from ptqbench.data import synthvqa as sv
from testbed.pool import log, patchify

GRID_THW = [1, sv.SIZE // 14, sv.SIZE // 14]  # one still image: (temporal, rows, columns) of 14-pixel patches


def dct_init_(conv: torch.nn.Conv3d) -> None:
    """Initialise the patch embedding with an orthonormal low-frequency 2D DCT basis per colour channel.

    DCT filters separate colour (DC terms) from shape (low frequencies) from the first step; with the
    default N(0, 0.02) init a patch's colour is entangled with the random per-pixel weights
    (docs/testbed.md).
    """
    out_c, in_c, t, p, _ = conv.weight.shape
    x = torch.arange(p, dtype=torch.float64)
    freqs = sorted(((u, v) for u in range(p) for v in range(p)), key=lambda f: (f[0] + f[1], f[0]))
    w = torch.zeros(out_c, in_c, t, p, p, dtype=torch.float64)
    k = 0
    for u, v in freqs:
        b = torch.cos(math.pi * (2 * x + 1) * u / (2 * p))[:, None] * torch.cos(math.pi * (2 * x + 1) * v / (2 * p))[None]
        b = b / b.norm() / math.sqrt(t)
        for c in range(in_c):
            if k < out_c:
                w[k, c] = b
                k += 1
    with torch.no_grad():
        conv.weight.copy_(w.to(conv.weight.dtype))


class CellHead(torch.nn.Module):
    """Auxiliary per-token loss on the merger output, scored against the LLM's own word embeddings.

    Each merged vision token is classified three ways -- colour, shape, text (what the grid cell
    under it holds, from the generator's scene description) -- with logits ``feats @ E[word]^T``
    where ``E`` is the (tied) embedding of the answer word ("red", "circle", "7", "cat"), plus a
    learned "nothing here" vector. Image tokens thus land near the embeddings of the words that
    describe them, the way a projector pre-trained for alignment does, and the LLM can answer by
    copying. Only used for training; not part of the checkpoint.
    """

    def __init__(self, model, tokenizer, with_count: bool = False):
        super().__init__()
        self.model = [model]  # not a submodule: the embedding belongs to the model
        groups = [list(sv.COLORS), list(sv.SHAPES), list(sv.DIGITS) + list(sv.WORDS)]
        ids = []
        for words in groups:
            row = []
            for w in words:
                t = tokenizer(w, add_special_tokens=False)["input_ids"]
                assert len(t) == 1, f"answer {w!r} is not a single token"
                row.append(t[0])
            ids.append(torch.tensor(row))
        for j, t in enumerate(ids):
            self.register_buffer(f"ids{j}", t)
        dim = model.config.text_config.hidden_size
        self.none = torch.nn.Parameter(torch.randn(3, dim) * 0.02)
        # Absolute grid row / column of every token: the vision tower only has relative (RoPE)
        # positions, and spatial questions need to compare where two objects are.
        self.grid = sv.GRID
        self.pos = torch.nn.Linear(dim, 2 * sv.GRID)
        # Optional: each object token also predicts how many objects of its shape the image holds
        # (global context in every token, as a real encoder's tokens carry; a count question becomes
        # "find a token of that shape, read its count", the retrieval the LLM learns first).
        self.with_count = with_count
        self.count = torch.nn.Linear(dim, 1 + sv.MAX_COUNT)

    def same_shape_counts(self, cells: torch.Tensor) -> torch.Tensor:
        g2 = self.grid * self.grid
        s = cells[:, 1].view(-1, g2)
        c = ((s[:, :, None] == s[:, None, :]) & (s[:, None, :] > 0)).sum(-1)
        return torch.where(s > 0, c, torch.zeros_like(c)).reshape(-1)

    def targets(self, cells: torch.Tensor) -> torch.Tensor:
        t = cells.clone()
        words = t[:, 2] > 10  # word parts (11 + 2w + part) -> one class per word
        t[words, 2] = 11 + (t[words, 2] - 11) // 2
        return t

    def logits(self, feats: torch.Tensor, j: int) -> torch.Tensor:
        emb = self.model[0].get_input_embeddings().weight
        w = torch.cat([self.none[j:j + 1], emb[getattr(self, f"ids{j}")]])
        return feats @ w.t()

    def loss(self, feats: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
        y = self.targets(cells)
        tot = 0.0
        for j in range(3):
            lg = self.logits(feats, j)
            w = torch.ones(lg.shape[-1], device=feats.device)
            w[0] = 0.1  # object/text cells are rare: "nothing here" must not dominate
            tot = tot + torch.nn.functional.cross_entropy(lg, y[:, j], weight=w)
        rc = self._rowcol(len(y), feats.device)
        pl = self.pos(feats)
        tot = tot + 0.5 * (torch.nn.functional.cross_entropy(pl[:, :self.grid], rc[:, 0])
                           + torch.nn.functional.cross_entropy(pl[:, self.grid:], rc[:, 1]))
        if not self.with_count:
            return tot / 4
        w = torch.ones(1 + sv.MAX_COUNT, device=feats.device)
        w[0] = 0.1
        return (tot + torch.nn.functional.cross_entropy(self.count(feats), self.same_shape_counts(cells), weight=w)) / 5

    def _rowcol(self, n: int, device) -> torch.Tensor:
        k = torch.arange(n, device=device) % (self.grid * self.grid)
        return torch.stack([k // self.grid, k % self.grid], 1)

    @torch.no_grad()
    def accuracy(self, feats: torch.Tensor, cells: torch.Tensor) -> list[float]:
        y = self.targets(cells)
        out = []
        for j in range(3):
            m = y[:, j] > 0
            out.append(float((self.logits(feats[m], j).argmax(-1) == y[m, j]).float().mean()) if m.any() else float("nan"))
        rc = self._rowcol(len(y), feats.device)
        pl = self.pos(feats)
        out.append(float(((pl[:, :self.grid].argmax(-1) == rc[:, 0]) & (pl[:, self.grid:].argmax(-1) == rc[:, 1])).float().mean()))
        if self.with_count:
            c = self.same_shape_counts(cells)
            m = c > 0
            out.append(float((self.count(feats[m]).argmax(-1) == c[m]).float().mean()))
        return out


@torch.no_grad()
def vision_features(model, images_u8: torch.Tensor, ip, device, batch: int = 64) -> torch.Tensor:
    """Merger outputs of a frozen vision tower for a whole pool, (N, tokens, hidden) float32 on the CPU."""
    model.eval()
    out = []
    t0 = time.time()
    for st in range(0, len(images_u8), batch):
        x = images_u8[st:st + batch]
        pv = patchify(x.to(device).permute(0, 3, 1, 2), ip)
        f = model.model.visual(pv, grid_thw=torch.tensor([GRID_THW] * len(x)).to(device)).pooler_output
        out.append(f.view(len(x), -1, f.shape[-1]).to("cpu", torch.float32))
    log(f"vision features of {len(images_u8)} images in {time.time() - t0:.0f}s")
    return torch.cat(out)



def pretrain_vision(model, cell_head: CellHead, images: torch.Tensor, cells: torch.Tensor, ip, device,
                    args) -> list[float]:
    """Stage 1: the vision tower alone on the per-token cell loss (``--vision-steps`` steps of
    ``--vision-batch`` pool images); returns its held-out cell accuracy."""
    vparams = list(model.model.visual.parameters()) + list(cell_head.parameters())
    vopt = torch.optim.AdamW(vparams, lr=args.vision_lr, betas=(0.9, 0.98), weight_decay=0.0)
    gv = torch.Generator().manual_seed(args.seed + 1)
    t_vis = time.time()
    model.train()
    for step in range(args.vision_steps):
        idx = torch.randint(0, len(images), (args.vision_batch,), generator=gv).tolist()
        for grp in vopt.param_groups:
            grp["lr"] = args.vision_lr * min(1.0, (step + 1) / 20)
        pv = patchify(images[idx].to(device).permute(0, 3, 1, 2), ip)
        thw = torch.tensor([GRID_THW] * len(idx))
        feats = model.model.visual(pv, grid_thw=thw.to(device)).pooler_output
        vloss = cell_head.loss(feats, cells[idx].reshape(-1, 3).to(device))
        vopt.zero_grad(set_to_none=True)
        vloss.backward()
        torch.nn.utils.clip_grad_norm_(vparams, 1.0)
        vopt.step()
        if step % 20 == 0 or step == args.vision_steps - 1:
            accs = cell_head.accuracy(feats, cells[idx].reshape(-1, 3).to(device))
            log(f"vision step {step:4d} cell loss {vloss.item():.4f} acc colour {accs[0]:.2f} shape {accs[1]:.2f} "
                f"text {accs[2]:.2f} position {accs[3]:.2f} ({(time.time() - t_vis) / (step + 1):.2f}s/step)")
    log(f"vision pre-training done in {(time.time() - t_vis) / 60:.1f} min")
    accs = heldout_cell_accuracy(model, cell_head, ip, device, args.data_seed)
    log(f"vision held-out cell acc colour {accs[0]:.3f} shape {accs[1]:.3f} text {accs[2]:.3f} position {accs[3]:.3f}")
    return accs


@torch.no_grad()
def heldout_cell_accuracy(model, cell_head: CellHead, ip, device, data_seed: int) -> list[float]:
    """Cell accuracy on 64 calibration-split scenes (never trained on)."""
    model.eval()
    hg, hc = sv.generate_multi_with_cells("calib", 64, seed=data_seed)
    himg = torch.from_numpy(np.stack([np.asarray(g[0].image.convert("RGB")) for g in hg]))
    hf = model.model.visual(patchify(himg.permute(0, 3, 1, 2), ip).to(device),
                            grid_thw=torch.tensor([GRID_THW] * len(hg)).to(device)).pooler_output
    return cell_head.accuracy(hf, torch.from_numpy(np.stack(hc)).reshape(-1, 3).to(device))
