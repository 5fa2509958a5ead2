"""Helpers shared by tests (importable because pytest puts tests/ on the path)."""

from ptqbench.engine import calibration as C


def tiny_samples(processor, n=8, seed=0):
    from ptqbench.models.tiny import tiny_batch

    return [C.Sample(im, q, a) for im, q, a in tiny_batch(processor, n=n, seed=seed)]


def write_sharegpt(tmp_path, samples):
    """A ShareGPT4V JSONL file with PNG images beside it."""
    import json

    (tmp_path / "images").mkdir(exist_ok=True)
    lines = []
    for i, s in enumerate(samples):
        s.image.save(tmp_path / "images" / f"{i}.png")
        lines.append(json.dumps({"id": str(i), "image": f"images/{i}.png", "conversations": [
            {"from": "human", "value": "<image>\n" + s.question}, {"from": "gpt", "value": s.answer}]}))
    path = tmp_path / "calib.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def store_writer(runs_dir, worker, n):
    """A process writing n cells into the results store (module-level: picklable for spawn)."""
    from ptqbench.grid.store import ResultsStore

    store = ResultsStore(runs_dir)
    for i in range(n):
        k = {"model": "tiny", "method": f"m{worker}", "method_options": {}, "bits": 2 + i % 7, "group_size": i,
             "sym": False, "calib_hash": "c0ffee"}
        cid = ResultsStore.cell_id(**k)
        store.start_cell(cid, k)
        store.finish_cell(cid, [{"task": "synthvqa", "metric": m, "value": float(i)} for m in ("acc", "nll")])


def outlier_model(model):
    """The tiny model with heavy-tailed norm weights: activation outlier channels, as in real LLMs (the
    random tiny model has none, and outliers are what AWQ's scaling is for). Layer-0 inputs (the
    calibration set) do not depend on the norms, so the shared calibration set still applies."""
    import copy

    import torch

    from ptqbench.models.adapters import adapter_for

    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for blk in adapter_for(m).decoder_layers():
            for n in ("input_layernorm", "post_attention_layernorm"):
                w = blk.get_submodule(n).weight
                w.mul_(torch.exp(torch.randn(w.shape, generator=g)))
    return m
