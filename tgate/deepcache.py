"""DeepCache (Ma et al. 2024) through the `DeepCache` package's own helper.

`DeepCacheSDHelper` wraps the U-Net's blocks: every `cache_interval` steps the whole
U-Net runs and the output of the shallow branch `cache_branch_id` is kept; in the steps
between only the shallow layers run and the deep features are reused. T-GATE changes
the batch at its gate step (the CFG batch of 2B rows becomes B rows) and caches the
CFG mean one step before, so, as tgate 1.0.0 does, the helper is restarted (disable +
enable: full computation, empty feature cache) at steps gate_step - 1 and gate_step,
and before each pipeline call.
"""
from __future__ import annotations

from dataclasses import dataclass

from diffusion.errors import UserError


@dataclass(frozen=True)
class DeepCacheConfig:
    """cache_interval: steps between full U-Net passes (1 = every step, no reuse).
    cache_branch_id: which skip branch's output is reused (0 = the shallowest)."""

    cache_interval: int = 3
    cache_branch_id: int = 0

    def __post_init__(self):
        for key, low in (("cache_interval", 1), ("cache_branch_id", 0)):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise UserError(f"deepcache {key}={value!r}: must be an integer >= {low}")


def make_helper(pipe, config: DeepCacheConfig):
    """A DeepCacheSDHelper for pipe with config's settings (not enabled yet)."""
    try:
        from DeepCache import DeepCacheSDHelper
    except ImportError as error:  # a dependency in pyproject; say what to install if it is missing
        raise ImportError("DeepCache with T-GATE needs the DeepCache package: pip install DeepCache==0.1.1") from error
    unet = getattr(pipe, "unet", None)
    if unet is None or not all(hasattr(unet, name) for name in ("down_blocks", "mid_block", "up_blocks")):
        raise UserError(f"deepcache: {type(pipe).__name__} has no U-Net with down/mid/up blocks "
                         "(DeepCache works on U-Net pipelines such as SD and SD-XL, not on transformers)")
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=config.cache_interval, cache_branch_id=config.cache_branch_id)
    return helper


class DeepCacheAttachment:
    """Keeps a DeepCache helper enabled on a pipeline's U-Net until `remove()`.

    The helper replaces `forward` of the U-Net and its blocks with instance attributes;
    `remove()` disables it and deletes what it left behind, so the modules are as before.
    """

    def __init__(self, pipe, helper):
        if getattr(helper, "function_dict", None):  # filled by enable(), emptied by disable()
            raise UserError("deepcache: this DeepCacheSDHelper is already enabled; call its disable() first "
                             "(T-GATE enables it for the gated calls and restarts it at the gate)")
        self.helper = helper
        self._unet = pipe.unet
        # modules that already had their own instance-level forward (keep those on removal)
        self._own_forward = {id(m) for m in self._unet.modules() if "forward" in vars(m)}
        helper.enable()

    def restart(self) -> None:
        """Full computation at the next U-Net call, no features of earlier steps kept."""
        self.helper.disable()
        self.helper.enable()

    def remove(self) -> None:
        self.helper.disable()
        for module in self._unet.modules():
            if id(module) in self._own_forward or "forward" not in vars(module):
                continue
            if getattr(module.forward, "__func__", None) is type(module).forward:
                del module.forward  # the helper's restore left the class's forward as an instance attribute

