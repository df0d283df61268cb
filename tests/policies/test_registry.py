"""config.py validates policy names without importing policies: the two lists must agree."""

from __future__ import annotations

from raycake.policies.scheduling import SCHEDULING_POLICIES, scheduling_policy_from_config
from raycake.policies.scheduling_config import SCHEDULING_POLICY_NAMES, SchedulingConfig


def test_config_names_every_registered_policy():
    assert set(SCHEDULING_POLICY_NAMES) == set(SCHEDULING_POLICIES)


def test_every_name_builds_its_policy():
    for name in SCHEDULING_POLICY_NAMES:
        assert scheduling_policy_from_config(SchedulingConfig(policy=name)).name == name
