"""The test suite (a package: Ola's environment has a stray top-level `tests` from bitsandbytes 0.43.1)."""
