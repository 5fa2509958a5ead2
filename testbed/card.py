"""The model card a training phase writes next to its checkpoint (MODEL_CARD.md): architecture,
the phase's recipe and exact command, the earlier phases' sections, and the held-out evaluation."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from ptqbench.data import synthvqa as sv
from ptqbench.eval import tasks as T
from testbed.pool import N_IMAGE_TOKENS

# args that are not part of the recipe: where files go, a dry run, what the phase set for itself
NOT_IN_COMMAND = ("out", "cache", "prepare_only", "steps_done", "prev_rope", "easy_objects")


def command(args) -> str:
    """The command line that replays the phase (every flag that is set, defaults included)."""
    return "python testbed/train.py " + " ".join(
        f"--{k.replace('_', '-')}" + ("" if isinstance(v, bool) else f" {v}") for k, v in vars(args).items()
        if k not in NOT_IN_COMMAND and v not in (False, None, ""))


def previous_phase(args) -> str:
    """A phase continuing a checkpoint (--init-from) carries that checkpoint's training section along."""
    if not args.init_from:
        return ""
    prev = (Path(args.init_from) / "MODEL_CARD.md").read_text()
    start = prev.index("## Training") + len("## Training")
    body = prev[start:prev.index("\n## ", start)].strip()
    body = body.replace("\n### ", "\n#### ")
    return ("\nThe lines above describe the last training phase; it started from the weights of the earlier phase "
            "below (`--init-from`, with a fresh optimiser):\n\n### Earlier phase\n" + body + "\n")


def data_line(args) -> str:
    extra = f" plus one more question of each of {args.extra.replace(',', ', ')}" if args.extra else ""
    where = ""
    if "where" in args.extra.split(","):
        where = (" (`where` is a training-only question: which side of the image centre one named object lies on, "
                 "the lookup a spatial question makes twice; it is never evaluated)")
    turns = ("; each question was trained as its own one-turn chat (`--single-turn`: image, instruction, question: "
             "exactly the evaluation prompt)" if args.single_turn
             else " (the first turn carries the image and the task instruction, exactly the evaluation prompt)")
    focus = ""
    if args.focus_steps:
        batch = f", {args.focus_batch} images per step" if args.focus_batch else ""
        keep = (f", the other families rehearsed: each of their chats kept with probability {args.focus_keep} "
                "(`--focus-keep`)" if args.focus_keep else "")
        focus = (f"; for the first {args.focus_steps} steps only the answers of {args.focus.replace(',', ', ')} were "
                 f"trained (`--focus`{batch}{keep})")
    return (f"SynthVQA `train` split, data seed {args.data_seed}, pool of {args.images} pre-rendered images; each "
            f"image {'has' if args.single_turn else 'is a multi-turn chat with'} one question of every family in "
            f"random order{extra}{where}{turns}{focus}")


def vision_line(args, vision_heldout) -> str:
    if args.init_from:
        line = "from the earlier phase"
        if args.vision_steps:
            line += (f"; first re-trained alone for {args.vision_steps} steps of {args.vision_batch} images on the "
                     "auxiliary cell loss")
            line += (" with the same-shape count target added (each object token also predicts how many objects of "
                     "its shape the image holds)" if args.aux_count else "")
        line += "; then " + ("kept frozen (its features computed once per pool image)" if args.freeze_vision
                             else f"trained with the rest (auxiliary cell loss weight {args.aux_weight})")
        if args.reinit_text is not None:
            line += (f"; the language model (embeddings, decoder, final norm) was **re-initialised** from "
                     f"N(0, {args.reinit_text}) and trained from scratch on this tower's features, so "
                     "nothing of the earlier decoder survives")
        return line
    line = ("patch embedding initialised with an orthonormal low-frequency DCT basis per colour channel; "
            if args.dct_init else "")
    if args.vision_steps:
        line += (f"pre-trained alone for {args.vision_steps} steps of {args.vision_batch} images with a per-token "
                 "auxiliary loss: each merged token is scored against the LLM's word embeddings of the colour / shape "
                 "/ text of the grid cell under it (from the generator's scene description) and a linear head "
                 "predicts the cell's grid row and column, an alignment stand-in for the pre-trained encoder and "
                 "projector a real VLM starts from (word embeddings frozen in this stage); the auxiliary heads are "
                 "discarded")
        if vision_heldout:
            h = vision_heldout
            line += (f" (held-out cell accuracy on 64 calib-split scenes: colour {h[0]:.3f}, shape {h[1]:.3f}, "
                     f"text {h[2]:.3f}, row+column {h[3]:.3f})")
    else:
        line += "trained from scratch with the rest"
    return line + (f"; the auxiliary loss stays on during QA training with weight {args.aux_weight}"
                   if args.aux_weight else "")


def rope_line(args, tc) -> str:
    """A phase that changed the M-RoPE split says so (only image tokens turn differently)."""
    prev_rope = getattr(args, "prev_rope", None)
    new_rope = (tuple(tc.rope_parameters["mrope_section"]), tc.rope_parameters["rope_theta"])
    if prev_rope is None or prev_rope == new_rope:
        return ""
    return (f"\n- positions: the M-RoPE split (temporal, row, column) changed from {list(prev_rope[0])} (base "
            f"{prev_rope[1]:g}) to {list(new_rope[0])} (base {new_rope[1]:g}) at the start of this phase; text "
            "tokens carry equal temporal, row and column positions, so only image tokens turn differently")


def training_section(args, config, run: dict) -> str:
    spectrum = run["spectrum"]
    spectral = (f"; plus {args.spectral_reg} x a spectral-flatness penalty on every decoder matrix "
                "(`spectral_flatness_penalty`: the squared distance of its normalised Gram matrix from the identity, "
                f"zero when all singular values are equal; {spectrum[0]:.2f} -> {spectrum[1]:.2f} over this phase; "
                f"random Gaussian matrices of the same shapes score {spectrum[2]:.2f})" if args.spectral_reg else "")
    captions = (f"{args.caption_prob:.0%} of the training images get a final `describe the image.` turn answered with "
                "the generator caption" if args.caption_prob else "none")
    budget = (f" (wall-clock budget {args.max_minutes} min, schedule planned for {args.steps})"
              if args.max_minutes else "")
    decay = "then constant (`--constant-lr`)" if args.constant_lr else "cosine decay to 5%"
    return f"""## Training
- data: {data_line(args)}
- vision tower: {vision_line(args, run["vision_heldout"])}{rope_line(args, config.text_config)}
- captions: {captions}
- loss: answer-only cross-entropy (answer tokens and the closing `<|im_end|>`; prompt, image and padding tokens are -100){spectral}
- optimiser: AdamW (betas 0.9/0.98, weight decay {args.wd}), lr {args.lr} with {args.warmup} warm-up steps and {decay}, grad-norm clip 1.0, {args.steps_done} steps of {args.batch} images{budget}, seed {args.seed}
- command: `{command(args)}`
- machine: {run["device"].type}: {run["machine"]}; transformers {transformers.__version__}, torch {torch.__version__}
- training time: {run["train_s"] / 60:.1f} min; total wall time (rendering, training, saving, evaluation): {run["wall"] / 60:.1f} min
{previous_phase(args)}"""


def model_card(args, config, run: dict) -> str:
    """``run``: n_params, n_vis, size (bytes on disk), device, machine, train_s, wall, eval_s, acc, nll,
    bg (background patch share), history (periodic probes), vision_heldout, spectrum (before, after,
    random reference)."""
    tc, vc = config.text_config, config.vision_config
    acc, nll = run["acc"], run["nll"]
    rows = "\n".join(f"| {f} | {acc.get(f'acc/{f}', float('nan')):.3f} | {nll.get(f'nll/{f}', float('nan')):.3f} |"
                     for f in sv.FAMILIES)
    hist = "\n".join(f"- step {h['step']}: acc {h['acc']:.3f}" for h in run["history"]) or "- (none)"
    return f"""# ptqbench testbed: tiny Qwen2-VL trained on SynthVQA

A `Qwen2VLForConditionalGeneration` (the real transformers architecture: Qwen2-VL vision tower with
2D RoPE and 2x2 patch merger, GQA decoder with M-RoPE) trained **from scratch** on the procedural
SynthVQA generator (`ptqbench.data.synthvqa`). It is the default model of ptqbench: small
enough to quantize and evaluate on a CPU in seconds. It is not a general-purpose model: it only
knows SynthVQA scenes. Whether quantization error shows up as lost accuracy is measured, not
assumed: see the known limitations (added by hand after training) and
`tests/models/test_testbed_discriminates.py`.

## Architecture
- parameters: {run["n_params"] / 1e6:.2f}M ({run["n_vis"] / 1e6:.2f}M vision), stored as float16 ({run["size"] / 1e6:.1f} MB directory)
- text: hidden {tc.hidden_size}, {tc.num_hidden_layers} layers, {tc.num_attention_heads} heads / {tc.num_key_value_heads} KV heads (GQA), MLP {tc.intermediate_size}, vocab {tc.vocab_size}, tied embeddings, M-RoPE sections {tc.rope_parameters.get('mrope_section')} (temporal, row, column), base {tc.rope_parameters.get('rope_theta'):g}
- vision: {vc.depth} blocks, width {vc.embed_dim}, {vc.num_heads} heads, patch {vc.patch_size}, merge {vc.spatial_merge_size}x{vc.spatial_merge_size}
- input: {sv.SIZE}x{sv.SIZE} images (processor min_pixels = max_pixels = {sv.SIZE * sv.SIZE}) -> {(sv.SIZE // 14) ** 2} patches -> **{N_IMAGE_TOKENS} vision tokens** per image
- tokenizer: byte-level BPE built with `tokenizers` over the generator's text (`testbed.build_tokenizer`), Qwen special tokens, Qwen-style chat template without a default system prompt

{training_section(args, config, run)}
## Evaluation (held-out `eval` split, seed {T.EVAL_SEED}, n={args.eval_n}, the checkpoint as stored, loaded in float32)
Greedy generation, exact match after strip/lowercase (`ptqbench.eval.tasks`, task `synthvqa`);
NLL is the mean answer-token negative log-likelihood (task `synthvqa-nll`).

| family | accuracy | answer NLL |
|---|---|---|
{rows}
| **overall** | **{acc['acc']:.3f}** | **{nll['nll']:.3f}** |

Evaluation of {args.eval_n} items took {run["eval_s"]:.1f}s on this machine.
Mean share of 14x14 patches that are pure background on these images: {run["bg"]:.3f}.

Periodic probes during training ({args.probe_n} eval items):
{hist}

## Integrity
`SHA256SUMS` lists every file; `ptqbench.models.testbed.load_testbed` verifies it before loading.
"""
