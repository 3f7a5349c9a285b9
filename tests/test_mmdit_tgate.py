"""T-GATE's guidance truncation on SD3 / SD3.5 (tiny random pipelines, offline): after the gate only the
conditional branch runs, equal bitwise to the pipeline's own guidance-off path; no attention module is
wrapped (joint attention is refused by the caching rules); steps counted as the progress bar counts them,
skip-layer guidance included; removal restores the pipeline; FLUX.1 refused."""
import numpy as np
import pytest
import torch

from tgate import TGateConfig, TGateHook, apply_tgate, is_gated, remove_tgate
from tstitch import stitch_pipeline

import tiny_mmdit as m

CALL = dict(height=m.IMAGE_SIZE, width=m.IMAGE_SIZE, output_type="np", max_sequence_length=m.MAX_TOKENS)
TRUNCATE = dict(cache_attention=False, branch="cond")


def _run(pipe, steps=10, **kwargs):
    return pipe(m.PROMPT, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), **CALL,
                **kwargs).images


def _guidance_off_from(gate: int, branch: str = "cond"):
    """A callback that makes the stock pipeline stop guidance after step gate - 1 and go on with one branch
    of its text embeddings (diffusers' documented way to change guidance mid-run): the reference."""
    half = {"uncond": 0, "cond": 1}[branch]

    def callback(pipe, i, t, tensors):
        if i != gate - 1:
            return {}
        pipe._guidance_scale = 1.0  # do_classifier_free_guidance is False from the next step on
        return {k: v.chunk(2)[half] for k, v in tensors.items()}

    return dict(callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["prompt_embeds",
                                                                                   "pooled_prompt_embeds"])


class RowLog:
    """Batch rows and skip-layer flag of every call of the real transformer(s)."""

    def __init__(self, *models):
        self.calls = []
        self.handles = [mod.register_forward_pre_hook(self._hook, with_kwargs=True) for mod in models]

    def _hook(self, module, args, kwargs):
        self.calls.append((kwargs["hidden_states"].shape[0], kwargs.get("skip_layers") is not None))

    def remove(self):
        for handle in self.handles:
            handle.remove()


def _hooked_modules(model):
    return [name for name, mod in model.named_modules() if getattr(mod, "_diffusers_hook", None) is not None]


@pytest.mark.parametrize("gate", [4, 7])
def test_truncation_equals_running_the_conditional_branch_alone_after_the_gate(gate):
    pipe = m.sd3_pipeline(seed=0)
    plain = _run(pipe)
    reference = _run(pipe, **_guidance_off_from(gate))
    unconditional = _run(pipe, **_guidance_off_from(gate, "uncond"))
    with apply_tgate(pipe, TGateConfig(gate_step=gate, **TRUNCATE)):
        log = RowLog(pipe.transformer)  # after the gate's own pre-hook: sees what the transformer computes
        gated = _run(pipe)
    log.remove()
    assert np.array_equal(gated, reference)
    # the third things: guidance on throughout, and the unconditional branch after the gate, both differ
    assert not np.array_equal(gated, plain) and not np.array_equal(gated, unconditional)
    assert [rows for rows, _ in log.calls] == [2] * gate + [1] * (10 - gate)  # the CFG batch until the gate


def test_truncation_wraps_no_attention_module():
    # SD3.5 Medium's MMDiT-X blocks hold a plain self-attention (attn2) beside the joint one: neither is touched
    transformer = m.sd3_transformer(seed=0, dual_attention_layers=(0,))
    assert transformer.transformer_blocks[0].attn2.is_cross_attention is False
    pipe = m.sd3_pipeline(seed=0, transformer=transformer)
    forwards = {name: mod.forward for name, mod in transformer.named_modules()}
    gate = apply_tgate(pipe, TGateConfig(gate_step=5, **TRUNCATE))
    assert is_gated(pipe) and _hooked_modules(transformer) == [] and gate.state.module_hooks == []
    assert {name: mod.forward for name, mod in transformer.named_modules()} == forwards
    _run(pipe)
    gate.remove()


def test_caching_rules_refuse_joint_attention():
    pipe = m.sd3_pipeline(seed=0)
    with pytest.raises(ValueError, match=r"SD3Transformer2DModel has joint attention .*'transformer_blocks.0.attn'.* "
                                         r"TGateConfig\(cache_attention=False, branch='cond'\)"):
        apply_tgate(pipe, TGateConfig(gate_step=5))
    assert not is_gated(pipe) and _hooked_modules(pipe.transformer) == []
    hook = TGateHook(gate_step=5)  # the sampler hook (scripts/count_macs.py) refuses it the same way
    with pytest.raises(ValueError, match="joint attention"):
        hook.attach([pipe.transformer], ["sd3"], None)
    with pytest.raises(ValueError, match=r"cache_attention=false .* branch='uncond'.*use branch='cond'"):
        TGateConfig(gate_step=5, cache_attention=False)


def test_removal_restores_the_pipeline_bitwise():
    pipe = m.sd3_pipeline(seed=0)
    cls, transformer = type(pipe), pipe.transformer
    before = _run(pipe)
    gate = apply_tgate(pipe, TGateConfig(gate_step=3, **TRUNCATE))
    assert not np.array_equal(_run(pipe), before)
    remove_tgate(pipe)
    assert gate.removed and type(pipe) is cls and pipe.transformer is transformer
    assert transformer._forward_pre_hooks == {} and transformer._forward_hooks == {}
    assert np.array_equal(_run(pipe), before)


def test_skip_layer_guidance_passes_belong_to_their_step():
    # SLG at steps 1..4 (0.01 * 10 < i < 0.5 * 10): a second, conditional-only call in each of those steps
    slg = dict(skip_guidance_layers=[0], skip_layer_guidance_stop=0.5)
    pipe = m.sd3_pipeline(seed=0)
    reference = _run(pipe, **slg, **_guidance_off_from(6))
    with apply_tgate(pipe, TGateConfig(gate_step=6, **TRUNCATE)):
        log = RowLog(pipe.transformer)
        gated = _run(pipe, **slg)
    log.remove()
    assert np.array_equal(gated, reference)  # the gate lands on step 6, not 4 calls early
    assert log.calls == [(2, False)] + [(2, False), (1, True)] * 4 + [(2, False)] + [(1, False)] * 4
    with apply_tgate(pipe, TGateConfig(gate_step=3, **TRUNCATE)):
        with pytest.raises(ValueError, match=r"skip-layer guidance would run at steps \[3, 4\], at or after "
                                             r"gate_step=3"):
            _run(pipe, **slg)


def test_stitched_sd3_with_truncation():
    small = m.sd3_transformer(seed=7, num_layers=1, head_dim=4, dual_attention_layers=(0,))
    pipe = stitch_pipeline(m.sd3_pipeline(seed=0), small, ratio=0.4)
    reference = _run(pipe, **_guidance_off_from(6))
    stitched = _run(pipe)
    log = RowLog(small, pipe.transformer.large)
    with apply_tgate(pipe, TGateConfig(gate_step=6, **TRUNCATE)):
        gated = _run(pipe)
    log.remove()
    assert np.array_equal(gated, reference) and not np.array_equal(gated, stitched)
    assert [rows for rows, _ in log.calls] == [2] * 6 + [1] * 4
    assert pipe.transformer.last_steps == [0] * 4 + [1] * 6


def test_flux_is_refused():
    with pytest.raises(ValueError, match=r"FluxPipeline's FluxTransformer2DModel takes the guidance scale as an input"):
        apply_tgate(m.flux_pipeline(seed=0), TGateConfig(gate_step=5, **TRUNCATE))
