"""lmms-eval bridge: the local synthvqa_lmms task through lmms-eval's own evaluator agrees with the
built-in synthvqa task; teacher-forced log-likelihood agrees with synthvqa-nll; registration; the
install hint without lmms-eval.

Runs on the trained testbed when its checkpoint exists, else on tiny:qwen2-vl (random weights:
accuracy is then 0, so the test also compares every generated string, which is the strong check).
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch

from ptqbench.eval import lmms as L
from ptqbench.data import synthvqa as sv
from ptqbench.eval.tasks import INSTRUCTION, SynthVQAAccuracy, SynthVQANLL, user_text
from ptqbench.errors import BadInput

N = 24  # 4 items per family; batches of 16 + 8 exercise a full and a partial left-padded batch
BATCH = 16
ROOT = Path(__file__).resolve().parents[2]

needs_lmms = pytest.mark.skipif(not L.lmms_available(),
                                reason="lmms_eval cannot be imported (optional extra: pip install 'ptqbench[lmms]')")


@pytest.fixture(scope="module")
def vlm():
    from ptqbench.models.testbed import TESTBED_DIR
    from ptqbench.models.sources import load_model

    torch.set_num_threads(1)
    lm = load_model("testbed" if TESTBED_DIR.is_dir() else "tiny:qwen2-vl")
    return lm.model.eval(), lm.processor


@pytest.fixture(scope="module")
def builtin(vlm):
    model, processor = vlm
    task = SynthVQAAccuracy()
    items = sv.generate("eval", N, seed=task.seed)
    return items, task.predict(model, processor, items, BATCH), task.evaluate(model, processor, n=N, batch_size=BATCH)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("lmms_cache")


# ----------------------------------------------------------------------------- without lmms-eval


def _hide_lmms(monkeypatch):
    for mod in [m for m in sys.modules if m == "lmms_eval" or m.startswith("lmms_eval.")] + ["lmms_eval"]:
        monkeypatch.setitem(sys.modules, mod, None)  # `import lmms_eval...` now raises ImportError
    monkeypatch.setattr(L, "_CLASS", None)
    monkeypatch.setattr(L, "_DEFAULT_TM", None)


def test_without_lmms_eval_the_error_is_the_install_hint(monkeypatch):
    _hide_lmms(monkeypatch)
    assert not L.lmms_available()
    for make in (lambda: L.LmmsTask("synthvqa_lmms"), lambda: L.LmmsTask("chartqa"), L.model_class, L.register):
        with pytest.raises(BadInput, match=r"pip install 'ptqbench\[lmms\]'"):
            make()
    err = L.unknown_task_error("mme", builtin=("synthvqa", "synthvqa-nll"))
    assert isinstance(err, BadInput) and "pip install 'ptqbench[lmms]'" in str(err) and "synthvqa-nll" in str(err)
    assert L.is_lmms_task("synthvqa_lmms") and not L.is_lmms_task("chartqa")
    with pytest.raises(AttributeError):
        L.no_such_thing  # noqa: B018


# ----------------------------------------------------------------------------- the task's pieces


def test_task_hooks_match_the_builtin_task(cache):
    from ptqbench.eval.lmms_tasks import utils as U

    folder = U.materialize(6, root=cache)
    assert (folder / U.YAML_NAME).read_bytes() == U.TEMPLATE.read_bytes()
    docs = [json.loads(line) for line in (folder / U.DATA_NAME).read_text().splitlines()]
    items = sv.generate("eval", 6)
    assert [d["id"] for d in docs] == [it.id for it in items]
    for d, it in zip(docs, items):  # lossless PNG round trip, same prompt text
        assert U.synthvqa_doc_to_visual(d)[0].tobytes() == it.image.convert("RGB").tobytes()
        kw = {"pre_prompt": "", "post_prompt": INSTRUCTION}
        assert U.synthvqa_doc_to_text(d, kw) == user_text(it.question)
    import yaml

    class _Loader(yaml.SafeLoader):
        pass

    _Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    cfg = yaml.load(U.TEMPLATE.read_text(), Loader=_Loader)
    assert cfg["lmms_eval_specific_kwargs"]["default"]["post_prompt"] == INSTRUCTION
    assert cfg["generation_kwargs"]["max_new_tokens"] == SynthVQAAccuracy().max_new_tokens
    assert {m["metric"] for m in cfg["metric_list"]} == {"acc"} | {f"acc/{f}" for f in sv.FAMILIES}
    d = dict(docs[0], answer="red")
    assert U.synthvqa_process_results(d, [" Red. "]) == {"acc": 1.0, f"acc/{d['family']}": 1.0}
    assert U.synthvqa_process_results(d, ["blue"])["acc"] == 0.0
    assert U.materialize(6, root=cache) == folder  # cached, keyed by content
    with pytest.raises(BadInput):
        U.materialize(0, root=cache)


# ----------------------------------------------------------------------------- through lmms-eval


@needs_lmms
def test_synthvqa_lmms_through_lmms_eval_equals_builtin(vlm, builtin, cache):
    model, processor = vlm
    items, preds, expected = builtin
    task = L.LmmsTask("synthvqa_lmms", cache_dir=cache)
    calls = []
    out = task.run(model, processor, n=N, batch_size=BATCH, progress=lambda d, t: calls.append((d, t)), log_samples=True)
    samples = sorted(out["samples"]["synthvqa_lmms"], key=lambda s: s["doc_id"])
    assert [s["doc"]["id"] for s in samples] == [it.id for it in items]
    assert [s["arguments"][0] if isinstance(s["arguments"][0], str) else s["arguments"][0][0] for s in samples] \
        == [user_text(it.question) for it in items]
    got = [s["resps"][0] if isinstance(s["resps"][0], str) else s["resps"][0][0] for s in samples]
    assert got == preds  # every generated string identical (same prompts, batches, padding, stop tokens)
    metrics = L._metrics(out, "synthvqa_lmms")
    assert metrics == expected  # exact: same predictions, same normalisation
    assert calls[-1] == (N, N)
    assert task.evaluate(model, processor, n=N, batch_size=BATCH) == expected  # the runner's interface


@needs_lmms
def test_loglikelihood_equals_builtin_nll(vlm):
    from lmms_eval.api.instance import Instance

    model, processor = vlm
    n = 12
    expected = SynthVQANLL().evaluate(model, processor, n=n, batch_size=BATCH)["nll"]
    items = sv.generate("eval", n)
    lm = L.model_class()(model=model, processor=processor, batch_size=BATCH)
    lm.task_dict = {"t": {"test": [{"image": it.image} for it in items]}}
    tok = processor.tokenizer
    end = tok.eos_token  # synthvqa-nll scores the answer turn: the word and the end-of-turn token
    reqs = [Instance("loglikelihood", (user_text(it.question), it.answer + end, lambda d: [d["image"]], i, "t", "test"), 0,
                     metadata={"task": "t", "doc_id": i, "repeats": 1}) for i, it in enumerate(items)]
    res = lm.loglikelihood(reqs)
    ks = []
    for it in items:
        p = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": user_text(it.question)}]}],
                                          add_generation_prompt=True, tokenize=False)
        ks.append(len(tok(p + it.answer + end, add_special_tokens=False)["input_ids"]) - len(tok(p, add_special_tokens=False)["input_ids"]))
    # lmms-eval's convention: the mean token NLL of each continuation; token-weighted it is synthvqa-nll
    assert sum(nll * k for (nll, _), k in zip(res, ks)) / sum(ks) == pytest.approx(expected, rel=1e-5)
    assert all(isinstance(g, bool) for _, g in res)


@needs_lmms
def test_multiple_choice_task_runs_through_loglikelihood(vlm, cache, tmp_path):
    """A local multiple_choice task: lmms-eval scores it from our loglikelihood (argmax over choices)."""
    from lmms_eval.api.instance import Instance

    from ptqbench.eval.lmms_tasks import utils as U

    model, processor = vlm
    folder = U.materialize(6, root=cache)
    docs = [json.loads(line) for line in (folder / U.DATA_NAME).read_text().splitlines()]
    rows = [dict(d, choices=[d["answer"], "zebra"], label=0) for d in docs]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "synthvqa_mc.yaml").write_text(
        "task: synthvqa_mc_test\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: mc.jsonl\n"
        "test_split: test\noutput_type: multiple_choice\n"
        "doc_to_visual: !function ptqbench.eval.lmms_tasks.utils.synthvqa_doc_to_visual\n"
        "doc_to_text: !function ptqbench.eval.lmms_tasks.utils.synthvqa_doc_to_text\n"
        "doc_to_choice: choices\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    lm = L.model_class()(model=model, processor=processor, batch_size=4)
    tm = TaskManager("WARNING", include_path=str(tmp_path), include_defaults=False, model_name=L.MODEL_NAME)
    out = simple_evaluate(model=lm, tasks=["synthvqa_mc_test"], task_manager=tm, bootstrap_iters=0,
                          log_samples=False, process_docs_parallel=1)
    acc = L._metrics(out, "synthvqa_mc_test")["acc"]
    # the same decision from direct calls: doc i is right when its answer has the lower NLL than "zebra"
    reqs = [Instance("loglikelihood", (r["question"], f" {c}", U.synthvqa_doc_to_visual, i, "t", "test"), 0,
                     metadata={"task": "t", "doc_id": i, "repeats": 1}) for i, r in enumerate(rows) for c in r["choices"]]
    lm.task_dict = {"t": {"test": rows}}
    lls = [lp for lp, _ in lm.loglikelihood(reqs)]
    assert acc == pytest.approx(sum(lls[2 * i] < lls[2 * i + 1] for i in range(len(rows))) / len(rows))


# ----------------------------------------------------------------------------- registration


def test_pyproject_declares_extra_and_entry_point():
    tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python >= 3.11")
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["entry-points"]["lmms_eval.models"]["ptqbench"] == "ptqbench.eval.lmms:manifest"
    assert any(r.startswith("lmms-eval") for r in meta["optional-dependencies"]["lmms"])


@needs_lmms
def test_entry_point_group_is_read_by_lmms_eval(tmp_path, monkeypatch):
    """lmms-eval's registry loads `lmms_eval.models` entry points: a dist-info declaring ours is enough."""
    from lmms_eval.models.registry_v2 import ModelRegistryV2

    dist = tmp_path / "ptqbench_ep_probe-0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ptqbench-ep-probe\nVersion: 0\n")
    (dist / "entry_points.txt").write_text("[lmms_eval.models]\nptqbench = ptqbench.eval.lmms:manifest\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = ModelRegistryV2()
    reg.load_entrypoint_manifests()
    assert reg.get_model_class("ptqbench") is L.model_class()


@needs_lmms
def test_register_and_build_from_arg_string():
    from lmms_eval import models

    L.register()
    cls = models.get_model("ptqbench")
    assert cls is L.model_class() and cls.__module__ == "ptqbench.eval.lmms"
    lm = cls.create_from_arg_string("pretrained=tiny:qwen2-vl,batch_size=2", {"batch_size": None, "device": "cpu"})
    assert lm.batch_size == 2 and lm.device.type == "cpu"
    lm.clean()  # lmms-eval calls this after a run: the model must survive
    assert lm.model is not None
    with pytest.raises(BadInput, match="pretrained"):
        cls()
    with pytest.raises(BadInput, match="bogus"):
        cls(pretrained="tiny:qwen2-vl", bogus=1)


@needs_lmms
def test_unknown_names_are_refused(monkeypatch):
    class _TM:
        all_tasks = ("chartqa", "mme")

    monkeypatch.setattr(L, "_DEFAULT_TM", _TM())  # skip indexing ~2000 lmms-eval YAML files
    assert L.is_lmms_task("mme") and L.is_lmms_task("synthvqa_lmms") and not L.is_lmms_task("nope")
    assert L.LmmsTask("chartqa").name == "chartqa"
    with pytest.raises(BadInput, match="lmms-eval --tasks list"):
        L.LmmsTask("nope", builtin=("synthvqa",))
    task = L.LmmsTask("synthvqa_lmms")
    with pytest.raises(BadInput):
        task.run(None, None, n=0)
