"""Tasks by name: the built-in SynthVQA tasks first, then lmms-eval's (through the bridge).

This module sits above both :mod:`ptqbench.eval.tasks` and the lmms-eval bridge
(:mod:`ptqbench.eval.lmms`, which builds on ``tasks``), so neither of them imports the other back.
"""

from __future__ import annotations

from ptqbench.eval.tasks import SynthVQAAccuracy, SynthVQANLL, Task

TASKS: dict[str, type] = {
    SynthVQAAccuracy.name: SynthVQAAccuracy,
    SynthVQANLL.name: SynthVQANLL,
}


def get_task(name: str, **kwargs) -> Task:
    """A built-in task, else an lmms-eval task (optional extra; BadInput with the install hint)."""
    if name in TASKS:
        return TASKS[name](**kwargs)
    from ptqbench.eval.lmms import LmmsTask  # lazy: optional and slow to import

    return LmmsTask(name, builtin=TASKS, **kwargs)
