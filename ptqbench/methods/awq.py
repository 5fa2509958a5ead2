"""awq: placeholder until implemented (see issue 4)."""
