"""Random-weight models from a real configuration with lazily materialized decoder blocks (`random:`)."""

import json

import pytest
import torch

from ptqbench.errors import BadInput
from ptqbench.engine import calibration as C
from ptqbench.models.adapters import adapter_for
from ptqbench.engine.blockwise import quantize_model
from ptqbench.models.lazy import build_random, is_lazy, materialize_all
from ptqbench.methods import QuantSpec, get_method

from _helpers import tiny_samples, write_sharegpt


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def config_path(tmp_path_factory):
    """A Qwen2-VL config.json (the shape of a real one, scaled down) written to disk."""
    from ptqbench.models.tiny import build_tiny

    model, _ = build_tiny("qwen2-vl")
    d = tmp_path_factory.mktemp("cfg")
    cfg = model.config.to_dict()
    cfg["image_token_id"] = 151655  # real ids: the random builder must replace them with its tokenizer's
    cfg["text_config"]["num_hidden_layers"] = 2
    cfg["text_config"].pop("layer_types", None)
    (d / "config.json").write_text(json.dumps(cfg))
    return d / "config.json"


def test_blocks_stay_on_meta_until_quantized(config_path):
    model, proc = build_random(str(config_path), dtype=torch.float32, seed=3)
    ad = adapter_for(model)
    assert all(is_lazy(layer) for layer in ad.decoder_layers())
    assert not any(p.is_meta for n, p in model.named_parameters() if ".layers." not in n)
    assert model.config.image_token_id == proc.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert not any(torch.isnan(b).any() for b in model.buffers() if not b.is_meta)


def test_lazy_quantization_equals_eager(config_path, tmp_path):
    """Materializing block by block inside the engine gives exactly what the eager model gives."""
    lazy, proc = build_random(str(config_path), dtype=torch.float32, seed=3)
    eager, _ = build_random(str(config_path), dtype=torch.float32, seed=3)
    materialize_all(eager, adapter_for(eager).decoder_layers())
    assert not is_lazy(eager)
    path = write_sharegpt(tmp_path, tiny_samples(proc, n=4))
    spec = QuantSpec(bits=3, group_size=16)
    results = []
    for model in (lazy, eager):
        ad = adapter_for(model)
        calib = C.build_calibration(model, ad, proc, str(path), 4, 512, 1, batch_size=2)
        results.append(quantize_model(model, ad, calib, get_method("gptaq")(spec), device="cpu"))
    assert results[0].quantized.keys() == results[1].quantized.keys()
    for k, qw in results[0].quantized.items():
        assert torch.equal(qw.qweight, results[1].quantized[k].qweight), k
        assert torch.equal(qw.scale, results[1].quantized[k].scale), k
    # the lazily built model now holds the quantized blocks on the CPU
    assert not is_lazy(lazy) and all(p.device.type == "cpu" for p in lazy.parameters())


def test_bench_run_random_model(config_path, tmp_path):
    from ptqbench.config import RunConfig
    from ptqbench.grid.runner import run_grid

    cfg = RunConfig.from_flat(model=f"random:{config_path}", methods=["gptq", "vlmq"], bits=[4], calib_n=4, group_size=16,
                    latency=False, save_model=False, runs=str(tmp_path / "runs"))
    summary = run_grid(cfg, log=lambda *_: None)
    assert [c.status for c in summary.cells] == ["done", "done"]
    assert all(c.metrics["recon/final_rel_err"] < 0.05 for c in summary.cells)


def test_max_blocks_cost_run(config_path, tmp_path):
    """--max-blocks N quantizes the first N blocks only, and the cell's identity says so."""
    from ptqbench.config import RunConfig
    from ptqbench.grid.cell import run_cell
    from ptqbench.grid.plan import plan, prepare

    cfg = RunConfig.from_flat(model=f"random:{config_path}", methods=["gptq"], bits=[4], calib_n=2, group_size=16, max_blocks=1,
                    latency=False, save_model=False, runs=str(tmp_path))
    grid = prepare(cfg, log=lambda *_: None)
    (cell,) = plan(grid)
    assert cell.key["method_options"]["max_blocks"] == 1
    artifacts = run_cell(grid, cell)["quant"]["artifacts"]
    assert {k.split(".")[3] for k in artifacts["diagnostics"]["linears"]} == {"0"}
    assert list(artifacts["diagnostics"]["blocks"]) == [0]


@pytest.mark.parametrize("kw, needle", [
    (dict(methods=["gptq"], max_blocks=0), "max-blocks 0"),
    (dict(methods=["mbq"]), "'mbq'"),
    (dict(methods=["gptq"], latency=True), "latency"),
    (dict(methods=["gptq"], tasks=["synthvqa"]), "synthvqa"),
])
def test_random_model_refusals(config_path, tmp_path, kw, needle):
    from ptqbench.config import RunConfig
    from ptqbench.grid.plan import prepare

    base = dict(model=f"random:{config_path}", bits=[4], calib_n=2, latency=False, save_model=False, runs=str(tmp_path))
    with pytest.raises(BadInput, match=needle):
        prepare(RunConfig.from_flat(**{**base, **kw}), log=lambda *_: None)


def test_bad_random_specs(tmp_path):
    from ptqbench.models.sources import load_model

    with pytest.raises(BadInput, match="does not exist"):
        load_model(f"random:{tmp_path}/nope.json")
    (tmp_path / "c.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(BadInput, match="'gpt2'"):
        load_model(f"random:{tmp_path}/c.json")
    with pytest.raises(BadInput, match="image side"):
        load_model(f"random:{tmp_path}/c.json@x")


def test_lazy_blocks_in_lockstep_equal_each_cell_alone(config_path, tmp_path):
    """A lockstep pass materializes each lazy block once and hands every cell a copy: the same weights."""
    import copy

    from ptqbench.engine.blockwise import Job, quantize_models

    lazy, proc = build_random(str(config_path), dtype=torch.float32, seed=3)
    path = write_sharegpt(tmp_path, tiny_samples(proc, n=4))
    calib = C.build_calibration(lazy, adapter_for(lazy), proc, str(path), 4, 512, 1, batch_size=2)
    specs = [("gptaq", QuantSpec(bits=3, group_size=16)), ("rtn", QuantSpec(bits=2, group_size=16))]
    alone = []
    for name, spec in specs:
        m = copy.deepcopy(lazy)
        alone.append(quantize_model(m, adapter_for(m), calib, get_method(name)(spec), device="cpu").quantized)
    jobs = [Job(copy.deepcopy(lazy), get_method(name)(spec)) for name, spec in specs]
    quantize_models(jobs, calib, device="cpu", memo={})
    for job, want in zip(jobs, alone):
        assert job.error is None and job.quantized.keys() == want.keys()
        for k, qw in job.quantized.items():
            assert torch.equal(qw.qweight, want[k].qweight) and torch.equal(qw.scale, want[k].scale), k
        assert not is_lazy(job.model)
