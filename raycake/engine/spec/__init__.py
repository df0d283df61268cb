"""Speculative decoding (EAGLE) in the engine: its configuration (``config``), draft trees and
their verification (``tree``), per-request acceptance and measured step costs that feed the
speculation policy (``controller``), and the runner that drafts with the head and verifies in the
target's step (``runner``). The decision itself is ``raycake.policies.speculation``; the draft
head is ``raycake.model.eagle``; its training is ``raycake.training.eagle_trainer``."""
