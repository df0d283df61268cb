"""Decisions, not mechanisms: eviction, scheduling (the conductor), expert routing.

Each policy is a small class behind a ``typing.Protocol``, chosen by name in config, so the
simulator and the real cluster run the very same objects. Eviction, scheduling and cost models
are pure Python (no torch, no Ray; tests import them with both blocked). Expert routing is the
exception: it is per-token math on a router-logits tensor, so ``routing.py`` imports torch, but
holds no weights and no state.
"""
