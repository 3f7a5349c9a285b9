"""T-GATE settings, checked when made (bad settings fail before any model is built)."""
from __future__ import annotations

from dataclasses import dataclass

from diffusion.errors import UserError

from .schedule import StepActions, check_schedule, gate_actions

BRANCHES = ("cond", "uncond")


@dataclass(frozen=True)
class TGateConfig:
    """gate_step: first step without guidance (the cross-attention outputs of step
    gate_step - 1 are cached and reused from then on); a value past the last step means
    no gate (cross-attention and guidance at every step) but, as in tgate 1.0.0, still
    self-attention reuse per sp_interval from warm_up on: the plain model is
    sp_interval=1, warm_up=0 (or no T-GATE). sp_interval / fi_interval: self-attention is recomputed every
    sp_interval steps before the gate and every fi_interval steps after it (1 = always).
    warm_up: steps before the first self-attention cache. lcm: the denoiser runs
    without a CFG batch (LCM), so caches keep their shape.
    branch: the CFG branch that runs once guidance stops: "uncond" as the reference
    does for text models (their text reaches the model only through the cached
    cross-attention), "cond" for class-conditional DiT (its class enters via adaLN).
    cache_attention: wrap the attention modules and cache / reuse their outputs (T-GATE);
    False: guidance truncation alone, no module is wrapped (SD3 / SD3.5, whose text
    reaches the image through joint attention, which has no T-GATE caching rule; the
    conditional branch must run then, since no cached attention carries the text).

    Defaults are the reference's SD-XL setting.
    """

    gate_step: int = 10
    sp_interval: int = 5
    fi_interval: int = 1
    warm_up: int = 2
    lcm: bool = False
    branch: str = "uncond"
    cache_attention: bool = True

    def __post_init__(self):
        check_schedule(self.gate_step, self.sp_interval, self.fi_interval, self.warm_up, self.lcm)
        if self.branch not in BRANCHES:
            raise UserError(f"tgate branch={self.branch!r}: must be one of {BRANCHES}")
        if not isinstance(self.cache_attention, bool):
            raise UserError(f"tgate cache_attention={self.cache_attention!r}: must be true or false")
        if not self.cache_attention and self.branch == "uncond":
            raise UserError("tgate cache_attention=false (guidance truncation alone) with branch='uncond': no cached "
                             "attention carries the prompt after the gate, so the unconditional branch would ignore "
                             "it; use branch='cond'")

    def check_guidance(self, use_cfg: bool) -> None:
        """lcm=True promises a denoiser without a CFG batch; refuse a run that has one."""
        if self.lcm and use_cfg:
            raise UserError("tgate lcm=true, but this run uses classifier-free guidance (a CFG batch); "
                             "set the guidance scale to 1 (sampler.cfg_scale=1) or lcm=false")

    def actions(self, s: int, use_cfg: bool = True) -> StepActions:
        """Step s's actions. Without a CFG batch (lcm, or cfg_scale 1) there are no halves
        to average, so the gate step caches the output as it is."""
        return gate_actions(s, self.gate_step, self.sp_interval, self.fi_interval, self.warm_up,
                            lcm=self.lcm or not use_cfg)
