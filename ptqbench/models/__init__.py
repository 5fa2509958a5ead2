"""Model sources (the table in sources.py), the testbed VLM, tiny and lazily built random models, and the
per-family adapters that map a checkpoint's modules onto the roles the engine and the methods use."""
