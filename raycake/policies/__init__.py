"""Decisions, not mechanisms: prefix-cache eviction, the conductor's scheduling (and the
baselines it is compared with), speculation budgets, expert routing, and the fitted step-cost
model they predict with.

Each policy is a small class behind a ``typing.Protocol``, chosen by name in config, so the
simulator and the real cluster run the very same objects. Everything here is pure Python (no
torch, no Ray; tests import it with both blocked) except expert routing: per-token math on a
router-logits tensor, so ``routing.py`` imports torch, but holds no weights and no state.
"""
