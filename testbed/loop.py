"""The question-answering stage of a training phase: answer-only cross-entropy over the pool's chats,
AdamW with warm-up and cosine (or constant) learning rate, optional focus on some families, the
auxiliary cell loss and the spectral-flatness penalty."""

from __future__ import annotations

import math
import time

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ptqbench.eval import tasks as T
from testbed.pool import collate, keep_families, log, patchify
from testbed.vision import GRID_THW


def spectral_flatness_penalty(weights) -> torch.Tensor:
    """Mean over matrices of ||G / mean(diag G) - I||_F^2 / d, G the smaller Gram matrix (d x d).

    Zero when every singular value is equal; a low-rank matrix scores about d / rank. Scale-free, so
    it shapes the spectrum without shrinking the weights."""
    tot = 0.0
    for w in weights:
        w = w.float()
        g = w @ w.t() if w.shape[0] <= w.shape[1] else w.t() @ w
        d = g.shape[0]
        g = g / (g.diagonal().mean() + 1e-12)
        tot = tot + ((g - torch.eye(d, device=g.device)) ** 2).sum() / d
    return tot / len(weights)


def decoder_matrices(model) -> list[torch.nn.Parameter]:
    """The weights of every linear layer of the decoder blocks (what the spectral penalty shapes)."""
    return [m.weight for _, m in model.model.language_model.layers.named_modules() if isinstance(m, torch.nn.Linear)]


def make_optimizer(model, cell_head, args) -> torch.optim.AdamW:
    """AdamW; no weight decay on embeddings, vectors and (with ``--aux-weight``) the auxiliary head."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in trainable if not (p.ndim >= 2 and "embed" not in n)]
    no_decay += list(cell_head.parameters()) if args.aux_weight else []
    return torch.optim.AdamW([{"params": decay, "weight_decay": args.wd},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=args.lr, betas=(0.9, 0.98), eps=1e-8)


class Schedule:
    """Linear warm-up, then constant (``--constant-lr``) or cosine decay to 5% of ``--lr``.

    Progress is the step's share of the planned steps or, with ``--max-minutes``, the share of the
    wall-clock budget spent, whichever is larger."""

    def __init__(self, args):
        self.args = args
        self.t0 = time.time()

    def progress(self, step: int) -> float:
        a = self.args
        p = (step - a.warmup) / max(1, a.steps - a.warmup)
        if a.max_minutes:
            p = max(p, (time.time() - self.t0) / (60 * a.max_minutes))
        return p

    def lr(self, step: int) -> float:
        a = self.args
        if step < a.warmup:
            return a.lr * (step + 1) / a.warmup
        if a.constant_lr:
            return a.lr
        p = min(1.0, self.progress(step))
        return a.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p)))


class PoolOrder:
    """Shuffled passes over the pool: a fresh permutation whenever the next batch would run past its end."""

    def __init__(self, n: int, g: torch.Generator):
        self.n, self.g = n, g
        self.order = torch.randperm(n, generator=g).tolist()
        self.pos = 0

    def take(self, k: int) -> list[int]:
        if self.pos + k > len(self.order):
            self.order = torch.randperm(self.n, generator=self.g).tolist()
            self.pos = 0
        idx = self.order[self.pos:self.pos + k]
        self.pos += len(idx)
        return idx


class QATraining:
    """One phase's question-answering loop over a rendered pool (`testbed.pool.load_pool`).

    ``vis_cache``: the frozen tower's features of every pool image (``--freeze-vision``), else None
    and the tower runs on every batch. All batch randomness comes from one generator seeded with
    ``--seed``, drawn in a fixed order, so a phase replays exactly."""

    def __init__(self, model, processor, cell_head, pool: dict, vis_cache, args, focus: tuple[str, ...], device):
        self.model, self.processor, self.cell_head = model, processor, cell_head
        self.pool, self.vis_cache, self.args, self.focus, self.device = pool, vis_cache, args, focus, device
        self.captured: dict = {}
        model.model.visual.merger.register_forward_hook(lambda mod, inp, out: self.captured.__setitem__("f", out))
        self.decoder = decoder_matrices(model)
        with torch.no_grad():
            self.spectrum_before = float(spectral_flatness_penalty(self.decoder))
            g_ref = torch.Generator().manual_seed(0)  # the reference: random Gaussian matrices of the same shapes
            self.spectrum_random = float(spectral_flatness_penalty(
                [torch.randn(w.shape, generator=g_ref) for w in self.decoder]))
        self.opt = make_optimizer(model, cell_head, args)
        self.g = torch.Generator().manual_seed(args.seed)
        self.order = PoolOrder(len(pool["seqs"]), self.g)
        self.pad_id = model.config.text_config.pad_token_id
        self.image_id = model.config.image_token_id
        self.history: list[dict] = []
        self.ema = None
        self.fam_ema: dict[str, float] = {}
        self.steps_done = 0

    def run(self) -> float:
        """Train for ``--steps`` steps (or until ``--max-minutes`` is spent); returns the seconds it took."""
        a = self.args
        task = T.SynthVQAAccuracy()
        self.schedule = Schedule(a)
        for step in range(a.steps):
            if step >= a.warmup and self.schedule.progress(step) >= 1.0:
                log(f"time budget spent after {step} steps")
                break
            self.steps_done = step + 1
            self.step(step)
            if (step + 1) % a.eval_every == 0 and step + 1 < a.steps:
                self.model.eval()
                r = task.evaluate(self.model, self.processor, n=a.probe_n, batch_size=32)
                self.history.append({"step": step + 1, **r})
                log("probe " + " ".join(f"{k}={v:.3f}" for k, v in r.items()))
        return time.time() - self.schedule.t0

    def batch(self, step: int):
        """Pool indices, chats (ids, labels), chats per image and the chats' families of one step."""
        a, seqs = self.args, self.pool["seqs"]
        # The draw of a retired curriculum (its share of simple scenes, always 0 here): kept so the
        # generator's sequence, hence every batch, is the one the recorded phases trained on.
        torch.rand(a.batch, generator=self.g)
        idx = self.order.take(a.focus_batch if (a.focus_batch and step < a.focus_steps) else a.batch)
        if a.single_turn:  # every question of the image as its own one-turn chat (the eval's prompt shape)
            keep = self.focus if step < a.focus_steps else None
            chats = [[(sq, fam) for sq, fam in zip(seqs[i][3], seqs[i][2])
                      if keep is None or fam in keep
                      or (a.focus_keep and float(torch.rand(1, generator=self.g)) < a.focus_keep)]
                     for i in idx]
            return idx, [sq for c in chats for sq, _ in c], [len(c) for c in chats], [f for c in chats for _, f in c]
        if step < a.focus_steps:
            chats = [(ids, keep_families(lab, fams, self.focus)) for ids, lab, fams, *_ in (seqs[i] for i in idx)]
        else:
            chats = [seqs[i][:2] for i in idx]
        return idx, chats, [1] * len(idx), []

    def image_inputs(self, idx: list[int], per_image: list[int]) -> dict:
        if self.vis_cache is not None:  # frozen tower: the features computed once, as the tower would give them
            f = self.vis_cache[idx]
            if self.args.single_turn:
                f = f.repeat_interleave(torch.tensor(per_image), dim=0)
            return {"mm_encoder_outputs": {"image": BaseModelOutputWithPooling(
                pooler_output=tuple(f.to(self.device, torch.float32)))}}
        images = self.pool["images"][idx].to(self.device).permute(0, 3, 1, 2)
        return {"pixel_values": patchify(images, self.processor.image_processor).to(self.device)}

    def step(self, step: int) -> None:
        a, device = self.args, self.device
        idx, chats, per_image, chat_fams = self.batch(step)
        input_ids, attn, labels, mm = collate(chats, self.pad_id, self.image_id)
        thw = torch.tensor([GRID_THW] * len(chats))
        image_in = self.image_inputs(idx, per_image)
        for grp in self.opt.param_groups:
            grp["lr"] = self.schedule.lr(step)
        self.model.train()
        out = self.model(input_ids=input_ids.to(device), attention_mask=attn.to(device), **image_in,
                         image_grid_thw=thw.to(device), mm_token_type_ids=mm.to(device))
        # mean cross-entropy over answer tokens (as the model's own loss), kept per token for logging
        tgt = labels[:, 1:].to(device)
        tok_loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].float().transpose(1, 2), tgt,
                                                     ignore_index=-100, reduction="none")
        loss = tok_loss.sum() / (tgt != -100).sum()
        cells = self.pool["cells"][idx].reshape(-1, 3).to(device)
        aux = self.cell_head.loss(self.captured["f"], cells) if a.aux_weight and not a.freeze_vision else None
        total = loss + a.aux_weight * aux if aux is not None else loss
        if a.spectral_reg:
            total = total + a.spectral_reg * spectral_flatness_penalty(self.decoder)
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        gn = torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        lv = loss.item()
        self.ema = lv if self.ema is None else 0.95 * self.ema + 0.05 * lv
        if a.single_turn:  # running loss per family: a plateau shows up in its own family first
            with torch.no_grad():
                per = tok_loss.sum(1) / (tgt != -100).sum(1).clamp(min=1)
            for fam, l_chat in zip(chat_fams, per.tolist()):
                self.fam_ema[fam] = l_chat if fam not in self.fam_ema else 0.98 * self.fam_ema[fam] + 0.02 * l_chat
        if step % 10 == 0 or step == a.steps - 1:
            cell_acc = self.cell_head.accuracy(self.captured["f"], cells) if aux is not None else None
            self.log_step(step, lv, len(chats), aux, cell_acc, float(gn))

    def log_step(self, step: int, lv: float, n_chats: int, aux, cell_acc, gnorm: float) -> None:
        el = time.time() - self.schedule.t0
        aux_part = fam_part = ""
        if aux is not None:
            aux_part = f"aux {aux.item():.3f} cell acc " + "/".join(f"{x:.2f}" for x in cell_acc) + " "
        if self.fam_ema:
            fam_part = "fam " + " ".join(f"{k}={v:.3f}" for k, v in sorted(self.fam_ema.items())) + " "
        log(f"step {step:5d} loss {lv:.4f} ema {self.ema:.4f} ({n_chats} chats) " + aux_part + fam_part
            + f"gnorm {gnorm:.2f} lr {self.schedule.lr(step):.2e} {el / (step + 1):.2f}s/step elapsed {el / 60:.1f}min")
