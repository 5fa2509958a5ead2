#!/usr/bin/env python
"""Train one phase of the embedded testbed VLM (Qwen2-VL architecture, from scratch) on SynthVQA.

A phase builds the tokenizer/processor/config from ``ptqbench.models.testbed`` (or continues a
checkpoint, ``--init-from``), renders the training pool (`testbed.pool`), optionally pre-trains the
vision tower alone (`testbed.vision`), trains on the questions with answer-only cross-entropy
(`testbed.loop`), saves the checkpoint (fp16 storage), reloads it through ``load_testbed``, scores
the held-out ``eval`` split and writes MODEL_CARD.md (`testbed.card`), train_metrics.json and
SHA256SUMS. Uses CUDA when available, else CPU. ``testbed/reproduce`` runs the shipped checkpoint's
phases in order (docs/testbed.md).

    python testbed/train.py --out runs/testbed_phase1 [flags]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# On a shared CPU, spinning OpenMP workers stall each other (docs/testbed.md); passive waiting costs
# nothing when the cores are free. Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ptqbench.data import synthvqa as sv  # noqa: E402
from ptqbench.eval import tasks as T  # noqa: E402
from ptqbench.eval.registry import get_task  # noqa: E402
from ptqbench.models import testbed as tb  # noqa: E402
from testbed.card import model_card  # noqa: E402
from testbed.loop import QATraining, spectral_flatness_penalty  # noqa: E402
from testbed.model import build_config, build_model  # noqa: E402
from testbed.pool import N_IMAGE_TOKENS, Encoder, check_patchify, load_pool, log  # noqa: E402
from testbed.vision import CellHead, pretrain_vision, vision_features  # noqa: E402


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def build_parser() -> argparse.ArgumentParser:
    """The flags, in the order the model card's recorded commands list them."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(tb.TESTBED_DIR))
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--data-seed", type=int, default=sv.DEFAULT_SEED["train"])
    ap.add_argument("--images", type=int, default=12000, help="training pool size (images)")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=16, help="images per step (each with 6 questions)")
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--warmup", type=int, default=60)
    ap.add_argument("--wd", type=float, default=0.05)
    ap.add_argument("--eval-n", type=int, default=T.DEFAULT_N)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--probe-n", type=int, default=96, help="items for the periodic eval")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", default=str(ROOT / "runs" / "testbed_cache"))
    ap.add_argument("--easy-objects", type=int, default=1,
                    help="no effect: the scene size of a retired curriculum, accepted so that the commands recorded "
                         "in the shipped model card still run")
    ap.add_argument("--dct-init", action="store_true", help="DCT-basis init of the patch embedding")
    ap.add_argument("--vision-steps", type=int, default=0,
                    help="stage 1: pre-train the vision tower alone with the per-token cell loss")
    ap.add_argument("--vision-lr", type=float, default=1e-3)
    ap.add_argument("--vision-batch", type=int, default=16)
    ap.add_argument("--freeze-vision", action="store_true",
                    help="stage 2: keep the pre-trained vision tower fixed (its features are computed once per "
                         "pool image and reused every epoch)")
    ap.add_argument("--spectral-reg", type=float, default=0.0, metavar="LAMBDA",
                    help="weight of a penalty pulling every decoder matrix's singular values towards equal "
                         "(an experiment: a decoder that must use its whole width)")
    ap.add_argument("--reinit-text", type=float, default=None, metavar="STD",
                    help="with --init-from: keep the vision tower, re-initialise the language model (embeddings, "
                         "decoder, final norm) from N(0, STD) and train it from scratch")
    ap.add_argument("--focus", default="", help="comma-separated families whose answers alone are trained for the "
                    "first --focus-steps steps (the others' labels are masked)")
    ap.add_argument("--focus-steps", type=int, default=0)
    ap.add_argument("--focus-batch", type=int, default=0,
                    help="images per step during the focus steps (default --batch; with --single-turn a focus step "
                         "trains only the focus chats, so it can afford more images)")
    ap.add_argument("--focus-keep", type=float, default=0.0, metavar="P",
                    help="with --single-turn: during the focus steps keep each other family's chat with probability "
                         "P (so the families already learned are rehearsed, not forgotten, while the focus is learned)")
    ap.add_argument("--constant-lr", action="store_true",
                    help="hold the learning rate at --lr after the warm-up (no cosine decay: for a plateau that "
                         "must be left before any decay)")
    ap.add_argument("--single-turn", action="store_true",
                    help="with --freeze-vision: train every question as its own one-turn chat right after the image "
                         "(the evaluation prompt), instead of one multi-turn chat per image")
    ap.add_argument("--rope-theta", type=float, default=None,
                    help="M-RoPE base (Qwen2-VL checkpoints use 1e6); default 1e4, or with --init-from the "
                         "checkpoint's own (a new base scrambles a trained decoder's text positions)")
    ap.add_argument("--mrope-section", default=None, metavar="T,H,W",
                    help="M-RoPE frequency pairs given to the temporal, row and column position (sum 32; the "
                         "lowest frequencies go last, to the column); default 8,12,12, or with --init-from the "
                         "checkpoint's own. Text tokens have equal t, h, w positions, so a new split moves only "
                         "how image tokens are rotated")
    ap.add_argument("--aux-weight", type=float, default=0.0,
                    help="stage 2: weight of the per-token cell loss added to the answer loss")
    ap.add_argument("--aux-count", action="store_true",
                    help="the auxiliary cell loss also asks each object token for the count of its shape in the image")
    ap.add_argument("--caption-prob", type=float, default=0.0,
                    help="share of training images that also get a 'describe the image.' turn")
    ap.add_argument("--extra", default="", help="comma-separated families asked a second time per image (e.g. count,spatial)")
    ap.add_argument("--prepare-only", action="store_true", help="render the training pool cache and stop")
    ap.add_argument("--init-from", default=None,
                    help="start from this finished checkpoint directory (a second training phase; use --vision-steps 0)")
    ap.add_argument("--layers", type=int, default=4,
                    help="decoder layers of a from-scratch model or a --reinit-text decoder (otherwise, with "
                         "--init-from, the checkpoint's own count)")
    ap.add_argument("--workers", type=int, default=1, help="processes rendering the training pool")
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="wall-clock budget of the QA training loop: the LR schedule follows the larger of step and "
                         "time progress, and training stops when either is spent (for a leased GPU)")
    return ap


def parse_args(argv=None):
    """The phase's flags, checked; returns (args, focus families, M-RoPE split)."""
    ap = build_parser()
    args = ap.parse_args(argv)
    focus = tuple(f for f in args.focus.split(",") if f)
    for f in focus:
        if f not in sv.FAMILIES + sv.TRAIN_FAMILIES:
            ap.error(f"--focus {f!r}: accepted families are {', '.join(sv.FAMILIES + sv.TRAIN_FAMILIES)}")
    if args.focus_batch and not args.focus_steps:
        ap.error("--focus-batch needs --focus-steps")
    if args.focus_steps and not focus:
        ap.error("--focus-steps needs --focus FAMILIES")
    if not 0.0 <= args.focus_keep <= 1.0:
        ap.error(f"--focus-keep {args.focus_keep!r}: accepted values are probabilities in [0, 1]")
    if args.focus_keep and not (args.single_turn and args.focus_steps):
        ap.error("--focus-keep needs --single-turn and --focus-steps")
    if args.single_turn and not args.freeze_vision:
        ap.error("--single-turn needs --freeze-vision (one tower pass per image, reused by its chats)")
    if args.single_turn and args.caption_prob:
        ap.error("--single-turn does not combine with --caption-prob")
    try:
        mrope = tuple(int(x) for x in (args.mrope_section or "8,12,12").split(","))
        assert len(mrope) == 3 and min(mrope) >= 0 and sum(mrope) == 32
    except (ValueError, AssertionError):
        ap.error(f"--mrope-section {args.mrope_section!r}: three non-negative integers summing to 32, e.g. 8,12,12")
    if args.reinit_text is not None and not (args.init_from and args.reinit_text > 0):
        ap.error(f"--reinit-text {args.reinit_text}: needs --init-from (the tower to keep) and a positive std")
    return args, focus, mrope


def main(argv=None) -> int:
    args, focus, mrope = parse_args(argv)
    t_start = time.time()
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    log(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    tok, processor, config = build_config(args, mrope)
    check_patchify(processor)
    pool = load_pool(args, Encoder(processor, N_IMAGE_TOKENS, False))
    if args.prepare_only:
        return 0
    seed_everything(args.seed)
    model = build_model(args, config, device)
    cell_head = CellHead(model, tok, with_count=args.aux_count).to(device)
    ip = processor.image_processor
    vision_heldout = pretrain_vision(model, cell_head, pool["images"], pool["cells"], ip, device, args) \
        if args.vision_steps else None
    vis_cache = None
    if args.freeze_vision:
        for p_ in model.model.visual.parameters():
            p_.requires_grad_(False)
        vis_cache = vision_features(model, pool["images"], ip, device)
    qa = QATraining(model, processor, cell_head, pool, vis_cache, args, focus, device)
    train_s = qa.run()
    args.steps_done = qa.steps_done  # for the card (a wall-clock budget may stop before args.steps)
    log(f"training done in {train_s / 60:.1f} min")
    run = {"train_s": train_s, "history": qa.history, "vision_heldout": vision_heldout, "device": device,
           "n_params": sum(p.numel() for p in model.parameters()),
           "n_vis": sum(p.numel() for p in model.model.visual.parameters())}
    save_phase(model, processor, config, args, run, (qa.spectrum_before, qa.decoder, qa.spectrum_random), t_start)
    return 0


def score(ckpt: Path, device, eval_n: int) -> dict:
    """The checkpoint as stored, reloaded through the checked loader, on the held-out eval split."""
    m2, p2 = tb.load_testbed(ckpt, dtype=torch.float32)
    m2.to(device)
    t_eval = time.time()
    acc = get_task("synthvqa").evaluate(m2, p2, n=eval_n, batch_size=32)
    eval_s = time.time() - t_eval
    nll = get_task("synthvqa-nll").evaluate(m2, p2, n=eval_n, batch_size=32)
    log("eval " + " ".join(f"{k}={v:.3f}" for k, v in {**acc, **nll}.items()))
    bg = float(np.mean([sv.background_patch_share(it.image) for it in sv.generate("eval", eval_n)]))
    return {"acc": acc, "nll": nll, "eval_s": eval_s, "bg": bg}


def save_phase(model, processor, config, args, run: dict, spectrum, t_start: float) -> None:
    """Save (fp16 storage) to OUT.tmp, score it, write the card, metrics and SHA256SUMS, then rename to OUT."""
    out_dir = Path(args.out)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.eval()
    model.to(torch.float16).save_pretrained(tmp)
    processor.save_pretrained(tmp)
    tb.write_sha256sums(tmp)
    run.update(score(tmp, run["device"], args.eval_n))
    run["size"] = sum(p.stat().st_size for p in tmp.iterdir() if p.is_file())
    run["wall"] = time.time() - t_start
    run["machine"] = (f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} logical CPUs, "
                      f"{torch.get_num_threads()} torch threads" if run["device"].type == "cpu"
                      else torch.cuda.get_device_name(0))
    before, decoder, random_ref = spectrum  # the decoder as stored (float16), against the phase's start
    run["spectrum"] = (before, float(spectral_flatness_penalty([w.detach() for w in decoder])), random_ref)
    (tmp / "MODEL_CARD.md").write_text(model_card(args, config, run))
    (tmp / "train_metrics.json").write_text(json.dumps(
        {"eval": {**run["acc"], **run["nll"]}, "background_patch_share": run["bg"], "history": run["history"],
         "train_seconds": run["train_s"], "wall_seconds": run["wall"], "args": vars(args),
         "vision_heldout_cell_acc": run["vision_heldout"]}, indent=1))
    tb.write_sha256sums(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    tb.load_testbed(out_dir)  # verify the final directory
    log(f"wrote {out_dir} ({run['size'] / 1e6:.1f} MB) in {run['wall'] / 60:.1f} min total")


if __name__ == "__main__":
    sys.exit(main())
