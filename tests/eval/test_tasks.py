import os

import pytest
import torch

from ptqbench.data import synthvqa as sv
from ptqbench.eval import registry as R
from ptqbench.eval import tasks as T
from ptqbench.models import testbed as tb
from ptqbench.errors import BadInput

os.environ.setdefault("HF_HUB_OFFLINE", "1")

HAVE_CKPT = (tb.TESTBED_DIR / "model.safetensors").is_file()
needs_ckpt = pytest.mark.skipif(not HAVE_CKPT, reason="testbed checkpoint not built yet (testbed/train.py)")


def test_registry(monkeypatch):
    import types

    from ptqbench.eval import lmms

    assert set(R.TASKS) == {"synthvqa", "synthvqa-nll"}
    assert isinstance(R.get_task("synthvqa"), T.SynthVQAAccuracy)
    # an unknown name falls through to lmms-eval (stubbed: no minute-long index of its ~2000 tasks)
    monkeypatch.setattr(lmms, "_DEFAULT_TM", types.SimpleNamespace(all_tasks=["chartqa"]))
    with pytest.raises(BadInput) as e:
        R.get_task("no-such-task")
    assert "'no-such-task'" in str(e.value) and "synthvqa-nll" in str(e.value)


def test_normalize():
    assert T.normalize("  Red.\n") == "red"
    assert T.normalize("7") == "7"


@pytest.fixture(scope="module")
def untrained():
    """A randomly initialised testbed-shaped model: exercises the task plumbing without a checkpoint."""
    from transformers import Qwen2VLForConditionalGeneration

    tok = tb.build_tokenizer()
    proc = tb.build_processor(tok)
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(tb.testbed_config(tok)).eval()
    return model, proc


def test_tasks_run_on_any_model(untrained):
    model, proc = untrained
    acc = R.get_task("synthvqa").evaluate(model, proc, n=8, batch_size=3)
    assert set(acc) == {"acc"} | {f"acc/{f}" for f in sv.FAMILIES}
    assert all(0.0 <= v <= 1.0 for v in acc.values())
    nll = R.get_task("synthvqa-nll").evaluate(model, proc, n=8, batch_size=3)
    assert nll["nll"] > 0 and set(nll) == {"nll"} | {f"nll/{f}" for f in sv.FAMILIES}
    # batch size must not change the result
    assert R.get_task("synthvqa-nll").evaluate(model, proc, n=8, batch_size=8)["nll"] == pytest.approx(nll["nll"], rel=1e-4)



def test_nll_scores_the_end_of_turn_token(untrained):
    # a model that answers right but cannot stop fails exact match; the NLL must see that too
    model, proc = untrained
    base = R.get_task("synthvqa-nll").evaluate(model, proc, n=6, batch_size=6)["nll"]
    eos = proc.tokenizer.eos_token_id
    bump = 40.0

    def no_stop(_mod, _inp, out):
        out = out.clone()
        out[..., eos] -= bump
        return out

    h = model.lm_head.register_forward_hook(no_stop)
    try:
        worse = R.get_task("synthvqa-nll").evaluate(model, proc, n=6, batch_size=6)["nll"]
    finally:
        h.remove()
    # answers here are 1-2 tokens plus the end token: at least a third of the scored tokens pay the bump
    assert worse > base + bump / 3, (base, worse)

def test_bad_n_and_batch(untrained):
    model, proc = untrained
    with pytest.raises(BadInput, match="n "):
        R.get_task("synthvqa").evaluate(model, proc, n=0)
    with pytest.raises(BadInput, match="batch_size"):
        R.get_task("synthvqa-nll").evaluate(model, proc, n=2, batch_size=0)


@needs_ckpt
def test_trained_testbed_scores_high():
    model, proc = tb.load_testbed()
    seen = []
    res = R.get_task("synthvqa").evaluate(model, proc, n=48, batch_size=16, progress=lambda d, t: seen.append(d))
    assert seen[-1] == 48
    # What the model card reports (n=300): overall 0.990, count 0.98, spatial 0.96, the rest 1.00 (issue
    # 3's target: >= 0.9 overall, >= 0.8 per family). 48 items are 8 a family: allow one miss in each.
    assert res["acc"] >= 0.9, res
    for fam in sv.FAMILIES:
        assert res[f"acc/{fam}"] >= 0.8, (fam, res)
    nll = R.get_task("synthvqa-nll").evaluate(model, proc, n=24)
    assert nll["nll"] < 0.2, nll
