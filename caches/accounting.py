"""Work a cached run really did: rows through each block and attention module, counted where the work is.

A cache that skips a block still *calls* it (diffusers' hooks return the cached value from inside the
block's forward), so calls say nothing. We count with forward pre-hooks on the first child of each
block (DiT: `norm1`; diffusers' blocks: their first norm) and on the first Linear of each attention
module (timm: `qkv`; diffusers: `to_q`), which run only when the block / attention is computed, and on
the model's first child (the patch embedder), which runs only for the rows the model really takes
(FasterCache drops the unconditional half). MACs: the plain MACs of one forward per row (runs/run.py
counts them on `meta`) split into the blocks, their attention and the rest; the per-row MACs of one
block and one attention are counted once on `meta` copies at the token count of the first call.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from diffusion.macs import count_macs


def _first_child(module: nn.Module) -> nn.Module | None:
    return next(iter(module.children()), None)


def _first_linear(module: nn.Module) -> nn.Module | None:
    return next((m for m in module.modules() if isinstance(m, nn.Linear)), None)


def _rows(args) -> int:
    return next((int(a.shape[0]) for a in args if torch.is_tensor(a) and a.ndim > 0), 0)


def _meta(value):
    return value.to("meta") if torch.is_tensor(value) else value


@dataclass
class ModelCounts:
    """Rows (batch rows, summed over calls) of one denoiser: asked by the sampler, taken by the model,
    through blocks, through attention modules."""

    asked: int = 0   # counted by the harness, outside the model
    tally: torch.Tensor = field(default_factory=lambda: torch.zeros(3, dtype=torch.int64))  # taken, blocks, attention
    depth: int = 0
    attention_per_block: int = 0
    block_macs: int | None = None       # one block, one row (all ops)
    attention_macs: int | None = None   # one attention module, one row
    handles: list = field(default_factory=list)

    @property
    def taken(self) -> int:
        return int(self.tally[0])

    @property
    def blocks(self) -> int:
        return int(self.tally[1])

    @property
    def attention(self) -> int:
        return int(self.tally[2])

    def reset(self) -> None:
        self.asked = 0
        self.tally.zero_()


class WorkCounter:
    """Counts the rows that really went through the blocks and attention of each model."""

    def __init__(self):
        self.models: list[ModelCounts] = []

    def attach(self, model: nn.Module, blocks: list[nn.Module], attention: list[nn.Module]) -> ModelCounts:
        counts = ModelCounts(depth=len(blocks), attention_per_block=len(attention) // max(len(blocks), 1))

        # counted into tensors in place: inside a compiled block (compile=regional) an in-place add is part
        # of the graph, whereas a Python int attribute would be a guard on its value (a recompile per call)
        def on_model(module, args):
            counts.tally[0].add_(_rows(args))

        def on_block(module, args, kwargs):
            counts.tally[1].add_(_rows(args))

        def on_attention(module, args):
            counts.tally[2].add_(_rows(args))

        inside = {id(m) for b in blocks for m in b.modules()}
        # the first layer with weights outside the blocks (DiT: the patch embedding): the rows the model takes
        first = next((m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and id(m) not in inside),
                     None)
        if first is not None:
            counts.handles.append(first.register_forward_pre_hook(on_model))
        for block in blocks:
            child = _first_child(block)
            if child is not None:
                counts.handles.append(child.register_forward_pre_hook(on_block, with_kwargs=True))
            if block is blocks[0]:
                counts.handles.append(block.register_forward_pre_hook(self._macs_hook(counts, block, "block_macs"),
                                                                      with_kwargs=True))
        for module in attention:
            linear = _first_linear(module)
            if linear is not None:
                counts.handles.append(linear.register_forward_pre_hook(on_attention))
        if attention:
            counts.handles.append(attention[0].register_forward_pre_hook(
                self._macs_hook(counts, attention[0], "attention_macs"), with_kwargs=True))
        self.models.append(counts)
        return counts

    @staticmethod
    def _macs_hook(counts: ModelCounts, module: nn.Module, attr: str):
        """Once, at the first call: the module's MACs per row, on a plain meta copy (no hooks) at batch 1."""
        template = plain_meta_copy(module)

        # eager under compile=regional: traced, its `is None` check and the arguments' count would be guards
        # that fail after the first call (a recompile of the block for bookkeeping)
        @torch.compiler.disable
        def hook(_, args, kwargs):
            if getattr(counts, attr) is None:
                one = [_meta(a[:1]) if torch.is_tensor(a) and a.ndim else _meta(a) for a in args]
                kw = {k: _meta(v[:1]) if torch.is_tensor(v) and v.ndim else _meta(v) for k, v in kwargs.items()}
                setattr(counts, attr, count_macs(lambda: template(*one, **kw))["macs_all"])
        return hook

    def detach(self) -> None:
        for counts in self.models:
            for handle in counts.handles:
                handle.remove()
            counts.handles = []  # the counts stay: metrics are read after the run's hooks are detached

    def reset(self) -> None:
        for counts in self.models:
            counts.reset()

    def metrics(self, names: list[str], per_forward_macs: list[int] | None, num_images: int) -> dict:
        """Per image: block passes (rows x blocks) computed and skipped, and the MACs really spent."""
        n = max(num_images, 1)
        computed = sum(c.blocks for c in self.models)
        plain = sum(c.asked * c.depth for c in self.models)
        out = {"cache_blocks_computed_per_image": computed / n,
               "cache_blocks_skipped_per_image": (plain - computed) / n,
               "cache_attention_computed_per_image": sum(c.attention for c in self.models) / n}
        if per_forward_macs is not None and all(c.block_macs is not None or c.asked == 0 for c in self.models):
            spent = 0
            for c, forward in zip(self.models, per_forward_macs, strict=True):
                if c.asked == 0:
                    continue
                attention = c.attention_macs or 0
                rest = forward - c.depth * c.block_macs        # embedders and final layer
                block_rest = c.block_macs - c.attention_per_block * attention
                spent += c.taken * rest + c.blocks * block_rest + c.attention * attention
            out["macs_per_image_spent"] = spent // n
        out["cache_counts_per_model"] = {name: {"rows_asked": c.asked, "rows_taken": c.taken,
                                                "block_rows": c.blocks, "attention_rows": c.attention}
                                         for name, c in zip(names, self.models, strict=True)}
        return out


def plain_meta_copy(module: nn.Module) -> nn.Module:
    """A copy of `module` on `meta` without the wrappers others put on it (diffusers' hooks replace
    `forward` on the instance; torch hooks sit in its hook dicts): its own computation only."""
    saved = []
    for m in module.modules():
        saved.append((m, {k: m.__dict__.pop(k) for k in ("forward", "_diffusers_hook") if k in m.__dict__},
                      m._forward_pre_hooks, m._forward_hooks))
        m._forward_pre_hooks, m._forward_hooks = type(m._forward_hooks)(), type(m._forward_hooks)()
    try:
        clone = copy.deepcopy(module)
    finally:
        for m, attrs, pre, post in saved:
            m.__dict__.update(attrs)
            m._forward_pre_hooks, m._forward_hooks = pre, post
    return clone.to("meta")
