"""vlmq: placeholder until implemented (see issue 4)."""
