"""How the shipped testbed checkpoint (ptqbench/models/testbed_model) was made: its training, stage
by stage (pool, model, vision, loop, card; `train.py` runs one phase), the outlier-channel rescale
and `reproduce`, which replays every phase. Not part of the installed package (docs/testbed.md)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the testbed is built from local files; nothing is fetched
