"""gptaq: placeholder until implemented (see issue 4)."""
