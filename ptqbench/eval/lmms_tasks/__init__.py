"""Local lmms-eval tasks of ptqbench (YAML + hooks). See :mod:`ptqbench.eval.lmms`."""
