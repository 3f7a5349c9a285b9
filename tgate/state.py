"""The decision of the current step, shared by every gated attention module.

One `TGateState` is owned by whoever drives the schedule (the sampler-level
`TGateHook`, or a user's own loop); the module hooks only read `actions`. The state
also knows its module hooks, so starting and ending a run can drop every cache.
"""
from __future__ import annotations

from .config import TGateConfig
from .schedule import PLAIN, StepActions


class TGateState:
    def __init__(self, config: TGateConfig):
        self.config = config
        self.actions: StepActions = PLAIN  # outside a run: compute everything
        self.use_cfg = True
        self.module_hooks: list = []  # AttentionGateHook of every wrapped module

    def clear_caches(self) -> None:
        for hook in self.module_hooks:
            hook.cache = None

    def start(self, use_cfg: bool) -> None:
        """A new sampling run: no cache of an earlier run may be reused."""
        self.config.check_guidance(use_cfg)
        self.use_cfg = use_cfg
        self.actions = PLAIN
        self.clear_caches()

    def step(self, s: int) -> StepActions:
        """Set (and return) the actions of step s for every module."""
        self.actions = self.config.actions(s, self.use_cfg)
        return self.actions

    def end(self) -> None:
        """Back to plain computing; the cached outputs are freed."""
        self.actions = PLAIN
        self.clear_caches()
