"""Our transformer blocks and attention in diffusers' registries, so its cache hooks find them.

diffusers' FirstBlockCache, MagCache and SeaCache look a block's class up in
`diffusers.hooks._helpers.TransformerBlockRegistry` (where its hidden states come in and go out);
PAB and FasterCache hook modules that are diffusers `Attention` classes. Both are private API
(pinned in pyproject: diffusers>=0.42,<0.43; tests/test_caches_registry.py fails loudly if they move).

Found without importing a model package: a model lists its repeated block classes in `_repeated_blocks`
(the compile=regional convention, diffusion.compile) and marks its attention modules with
`is_cross_attention` (diffusion.attention). A native block is `forward(hidden_states, *conditioning)
-> hidden_states` (one tensor in, one out, as our DiTBlock), so its metadata names the first argument.
"""
from __future__ import annotations

import inspect

import torch.nn as nn
from diffusers.hooks._common import _ALL_TRANSFORMER_BLOCK_IDENTIFIERS, _ATTENTION_CLASSES
from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry
from diffusers.utils.torch_utils import unwrap_module

from diffusion.attention import find_attention
from diffusion.compile import repeated_block_names
from diffusion.errors import UserError


def block_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """The children of `model` that diffusers' block caches walk: ModuleLists named as diffusers' identifiers."""
    model = unwrap_module(model)
    return [(name, child) for name, child in model.named_children()
            if name in _ALL_TRANSFORMER_BLOCK_IDENTIFIERS and isinstance(child, nn.ModuleList)]


def blocks_of(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, block) for every block the block caches hook, in call order."""
    return [(f"{name}.{i}", block) for name, blocks in block_lists(model) for i, block in enumerate(blocks)]


def is_registered(cls: type) -> bool:
    TransformerBlockRegistry._register()  # diffusers fills its own entries lazily
    return cls in TransformerBlockRegistry._registry


def register_native_blocks(model: nn.Module) -> list[type]:
    """Register the classes of `model`'s `_repeated_blocks` that diffusers does not know; returns them."""
    names = repeated_block_names(model)
    added = []
    for _, block in blocks_of(model):
        cls = type(unwrap_module(block))
        if cls.__name__ not in names or is_registered(cls):
            continue
        params = list(inspect.signature(cls.forward).parameters)[1:]  # without self
        if not params:
            raise UserError(f"{cls.__name__}.forward takes no hidden states; diffusers' caches cannot hook it")
        metadata = TransformerBlockMetadata(return_hidden_states_index=0, return_encoder_hidden_states_index=None,
                                            hidden_states_argument_name=params[0])
        # diffusers' FirstBlockCache asks for "hidden_states" by that literal name: point it at the first argument
        metadata._cached_parameter_indices = {"hidden_states": 0, **{p: i for i, p in enumerate(params)}}
        TransformerBlockRegistry.register(cls, metadata)
        added.append(cls)
    return added


def check_blocks(model: nn.Module, name: str, cache: str) -> list[tuple[str, nn.Module]]:
    """The model's blocks, all registered, or one UserError saying why the block cache cannot run."""
    register_native_blocks(model)
    blocks = blocks_of(model)
    if len(blocks) < 2:
        raise UserError(f"{cache} needs a stack of transformer blocks (a ModuleList named one of "
                         f"{', '.join(sorted(_ALL_TRANSFORMER_BLOCK_IDENTIFIERS))}); {name} "
                         f"({type(model).__name__}) has {len(blocks)}")
    for block_name, block in blocks:
        cls = type(unwrap_module(block))
        if not is_registered(cls):
            raise UserError(f"{cache}: {name}'s block {block_name} ({cls.__name__}) is neither in diffusers' "
                             "TransformerBlockRegistry nor listed in its model's _repeated_blocks")
    return blocks


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every attention module the attention caches (PAB, FasterCache) may hook:
    diffusers' Attention classes and our marked ones (diffusion.attention), inside the block stacks."""
    found = {name: module for name, module in find_attention(model)}
    for name, module in model.named_modules():
        if isinstance(module, _ATTENTION_CLASSES):
            found.setdefault(name, module)
    lists = tuple(f"{name}." for name, _ in block_lists(model))
    return [(name, module) for name, module in found.items() if name.startswith(lists)]
