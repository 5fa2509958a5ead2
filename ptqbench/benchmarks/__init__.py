"""Benchmarks: the SynthVQA generator, the embedded testbed VLM and the scoring tasks.

- ``ptqbench.benchmarks.synthvqa``: procedural visual QA (``generate``, ``write_sharegpt4v``,
  ``background_patch_share``), deterministic by seed, disjoint train/calib/eval splits.
- ``ptqbench.benchmarks.testbed``: the default model, a tiny trained Qwen2-VL shipped in
  ``testbed_model/`` (``load_testbed`` checks SHA256SUMS first).
- ``ptqbench.benchmarks.tasks``: ``TASKS`` / ``get_task`` (``synthvqa``, ``synthvqa-nll``).

Submodules are imported on demand so that ``import ptqbench`` stays light.
"""
