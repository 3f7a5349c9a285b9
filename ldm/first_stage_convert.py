"""First-stage weights: CompVis layout <-> diffusers layout, both ways.

CompVis (latent-diffusion / stable-diffusion `ldm/models/autoencoder.py` VQModel, VQModelInterface,
AutoencoderKL built from `ldm/modules/diffusionmodules/model.py` Encoder/Decoder and taming's
VectorQuantizer2) names its first stage

    encoder.conv_in  encoder.down.{i}.block.{j}  encoder.down.{i}.attn.{j}  encoder.down.{i}.downsample.conv
    encoder.mid.block_1  encoder.mid.attn_1  encoder.mid.block_2  encoder.norm_out  encoder.conv_out
    decoder.conv_in  decoder.mid.(block_1|attn_1|block_2)  decoder.up.{i}.block.{j}  decoder.up.{i}.attn.{j}
    decoder.up.{i}.upsample.conv  decoder.norm_out  decoder.conv_out
    quant_conv  post_quant_conv  quantize.embedding (VQ only)

with ResnetBlock leaves norm1 conv1 norm2 conv2 [nin_shortcut] and AttnBlock leaves norm q k v proj_out
(1x1 convs). diffusers' VQModel / AutoencoderKL name the same modules

    {encoder,decoder}.conv_in  encoder.down_blocks.{i}.resnets.{j}  encoder.down_blocks.{i}.attentions.{j}
    encoder.down_blocks.{i}.downsamplers.0.conv  {encoder,decoder}.mid_block.resnets.{0,1}
    {encoder,decoder}.mid_block.attentions.0  {encoder,decoder}.conv_norm_out  {encoder,decoder}.conv_out
    decoder.up_blocks.{n-1-i}.resnets.{j}  decoder.up_blocks.{n-1-i}.attentions.{j}
    decoder.up_blocks.{n-1-i}.upsamplers.0.conv

with resnet leaves norm1 conv1 norm2 conv2 [conv_shortcut] and attention leaves group_norm to_q to_k to_v
to_out.0 (linear layers). Two things change besides names: CompVis numbers decoder levels from the
full-resolution end (`up.0` is the last one run) while diffusers numbers them in run order, and the
attention projections are (C, C, 1, 1) conv kernels in CompVis but (C, C) linear weights in diffusers.

The converters need no config: the number of levels and blocks is read from the keys, and the key set is
checked for completeness against the structure those keys imply (every resnet and attention block whole,
block indices contiguous, one more decoder block per level than encoder blocks, a down/upsampler between
levels, the top-level convs and, for VQ, the codebook).
"""
from __future__ import annotations

import re
from typing import Mapping

import torch

from diffusion.errors import CheckpointKeyError, UserError

KINDS = ("vq", "kl")
FIRST_STAGE_PREFIX = "first_stage_model."
# Training-only modules a CompVis first-stage checkpoint may carry (LPIPS + discriminator, KL logvar):
# CompVis sampling never touches them, so they are dropped, not reported as unknown.
TRAINING_ONLY_PREFIXES = ("loss.",)

_PLAIN, _RESNET, _ATTN, _CODEBOOK = "plain", "resnet", "attn", "codebook"
# leaf names, CompVis -> diffusers
_RESNET_LEAVES = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
                  "nin_shortcut": "conv_shortcut"}
_ATTN_LEAVES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_ATTN_PROJECTIONS = ("q", "k", "v", "proj_out")  # 1x1 conv in CompVis, linear in diffusers
_LEAVES = {_RESNET: _RESNET_LEAVES, _ATTN: _ATTN_LEAVES}

# (CompVis module, diffusers module, module type). {p}: encoder|decoder; {i}: CompVis level index;
# {r}: diffusers decoder level index = n_levels - 1 - i; {j}: block index within a level.
_RULES = (
    ("{p}.conv_in", "{p}.conv_in", _PLAIN),
    ("{p}.norm_out", "{p}.conv_norm_out", _PLAIN),
    ("{p}.conv_out", "{p}.conv_out", _PLAIN),
    ("{p}.mid.block_1", "{p}.mid_block.resnets.0", _RESNET),
    ("{p}.mid.block_2", "{p}.mid_block.resnets.1", _RESNET),
    ("{p}.mid.attn_1", "{p}.mid_block.attentions.0", _ATTN),
    ("encoder.down.{i}.block.{j}", "encoder.down_blocks.{i}.resnets.{j}", _RESNET),
    ("encoder.down.{i}.attn.{j}", "encoder.down_blocks.{i}.attentions.{j}", _ATTN),
    ("encoder.down.{i}.downsample.conv", "encoder.down_blocks.{i}.downsamplers.0.conv", _PLAIN),
    ("decoder.up.{i}.block.{j}", "decoder.up_blocks.{r}.resnets.{j}", _RESNET),
    ("decoder.up.{i}.attn.{j}", "decoder.up_blocks.{r}.attentions.{j}", _ATTN),
    ("decoder.up.{i}.upsample.conv", "decoder.up_blocks.{r}.upsamplers.0.conv", _PLAIN),
    ("quant_conv", "quant_conv", _PLAIN),
    ("post_quant_conv", "post_quant_conv", _PLAIN),
    ("quantize.embedding", "quantize.embedding", _CODEBOOK),
)


def _template_regex(template: str, leaves: list[str] | None) -> re.Pattern:
    """'{p}.down.{i}.block.{j}' + leaves -> a regex with named groups p, i, r, j, leaf, param."""
    pattern = re.escape(template)
    for name, group in (("p", r"(?P<p>encoder|decoder)"), ("i", r"(?P<i>\d+)"),
                        ("r", r"(?P<r>\d+)"), ("j", r"(?P<j>\d+)")):
        pattern = pattern.replace(re.escape("{" + name + "}"), group)
    if leaves is not None:
        pattern += r"\.(?P<leaf>" + "|".join(re.escape(leaf) for leaf in leaves) + ")"
    return re.compile(pattern + r"\.(?P<param>weight|bias)$")


def _compile_rules():
    compiled = []
    for compvis, diffusers, kind in _RULES:
        leaves = _LEAVES.get(kind)
        compiled.append({
            "compvis": (compvis, _template_regex(compvis, list(leaves) if leaves else None)),
            "diffusers": (diffusers, _template_regex(diffusers, list(leaves.values()) if leaves else None)),
            "type": kind,
        })
    return compiled


_COMPILED = _compile_rules()


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise UserError(f"unknown first-stage kind {kind!r}: allowed are {', '.join(map(repr, KINDS))} "
                         "(VQModel/VQModelInterface -> 'vq', AutoencoderKL -> 'kl')")


def _strip_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop a leading 'first_stage_model.' and the training-only modules."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        bare = key[len(FIRST_STAGE_PREFIX):] if key.startswith(FIRST_STAGE_PREFIX) else key
        if bare.startswith(TRAINING_ONLY_PREFIXES):
            continue
        if bare in out:
            raise UserError(f"first-stage key {bare!r} is given both with and without the "
                             f"{FIRST_STAGE_PREFIX!r} prefix")
        out[bare] = value
    return out


def select_first_stage(checkpoint_state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The `first_stage_model.*` entries of a whole CompVis LDM checkpoint, prefix removed."""
    selected = {k[len(FIRST_STAGE_PREFIX):]: v for k, v in checkpoint_state_dict.items()
                if k.startswith(FIRST_STAGE_PREFIX)}
    if not selected:
        sample = _format_list(list(checkpoint_state_dict)[:5], limit=5)
        raise CheckpointKeyError(f"the checkpoint has no {FIRST_STAGE_PREFIX!r} entries (first keys: {sample}): "
                       "is it a CompVis LatentDiffusion checkpoint?")
    return selected


def _n_levels(keys, level_regex: str, what: str) -> int:
    """Number of resolution levels = 1 + the largest level index in keys matching level_regex."""
    found = [int(m.group(1)) for k in keys if (m := re.match(level_regex, k))]
    if not found:
        raise UserError(f"first-stage state dict has no {what} keys: cannot tell the number of levels")
    return max(found) + 1


def _format_list(names, limit: int = 40) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f" ... and {len(names) - limit} more" if len(names) > limit else "")


def _translate(key: str, src: str, dst: str, n_levels: int, kind: str) -> str | None:
    """One key from layout src ('compvis'|'diffusers') to layout dst, or None if no rule matches."""
    for rule in _COMPILED:
        m = rule[src][1].match(key)
        if m is None:
            continue
        if rule["type"] == _CODEBOOK and (kind != "vq" or m["param"] != "weight"):
            return None
        groups = {name: value for name, value in m.groupdict().items() if value is not None}
        if "i" in groups and "r" not in groups:
            groups["r"] = str(n_levels - 1 - int(groups["i"]))
        elif "r" in groups and "i" not in groups:
            groups["i"] = str(n_levels - 1 - int(groups["r"]))
        if int(groups.get("i", 0)) >= n_levels:
            return None
        out = rule[dst][0].format(**groups)
        if "leaf" in groups:
            leaves = _LEAVES[rule["type"]]
            leaf = groups["leaf"] if src == "compvis" else next(c for c, d in leaves.items() if d == groups["leaf"])
            out += "." + (leaves[leaf] if dst == "diffusers" else leaf)
        return out + "." + groups["param"]
    return None


def _expected_compvis_keys(compvis_sd: Mapping[str, torch.Tensor], kind: str, n_levels: int) -> set[str]:
    """The CompVis key set implied by the structure visible in compvis_sd's keys (CompVis names).

    CompVis Encoder: per level num_res_blocks ResnetBlocks (+ as many AttnBlocks at attention
    resolutions), a Downsample after every level but the last. Decoder: num_res_blocks + 1 blocks per
    level, an Upsample after every level but level 0. Mid: block_1, attn_1 (absent with attn_type
    'none'), block_2. A resnet has nin_shortcut iff its channel count changes.
    """
    keys = set(compvis_sd)

    def index_max(regex: str) -> int:
        return max((int(m.group(1)) for k in keys if (m := re.match(regex, k))), default=-1)

    res_blocks = max(index_max(r"encoder\.down\.\d+\.block\.(\d+)\."),
                     index_max(r"decoder\.up\.\d+\.block\.(\d+)\.") - 1) + 1
    resnet_paths, attn_paths, plain_paths = [], [], []
    for part in ("encoder", "decoder"):
        plain_paths += [f"{part}.conv_in", f"{part}.norm_out", f"{part}.conv_out"]
        resnet_paths += [f"{part}.mid.block_1", f"{part}.mid.block_2"]
    if any(re.match(r"(encoder|decoder)\.mid\.attn_1\.", k) for k in keys):
        attn_paths += ["encoder.mid.attn_1", "decoder.mid.attn_1"]
    for i in range(n_levels):
        for _part, level, blocks in (("encoder", f"encoder.down.{i}", res_blocks),
                                     ("decoder", f"decoder.up.{i}", res_blocks + 1)):
            resnet_paths += [f"{level}.block.{j}" for j in range(blocks)]
            if any(k.startswith(f"{level}.attn.") for k in keys):
                attn_paths += [f"{level}.attn.{j}" for j in range(blocks)]
        if i != n_levels - 1:
            plain_paths.append(f"encoder.down.{i}.downsample.conv")
        if i != 0:
            plain_paths.append(f"decoder.up.{i}.upsample.conv")
    plain_paths += ["quant_conv", "post_quant_conv"]

    expected = {f"{p}.{param}" for p in plain_paths for param in ("weight", "bias")}
    for path in resnet_paths:
        leaves = ["norm1", "conv1", "norm2", "conv2"]
        conv1 = compvis_sd.get(f"{path}.conv1.weight")
        changes_width = conv1 is not None and conv1.ndim == 4 and conv1.shape[0] != conv1.shape[1]
        if changes_width or f"{path}.nin_shortcut.weight" in keys or f"{path}.nin_shortcut.bias" in keys:
            leaves.append("nin_shortcut")
        expected |= {f"{path}.{leaf}.{param}" for leaf in leaves for param in ("weight", "bias")}
    for path in attn_paths:
        expected |= {f"{path}.{leaf}.{param}" for leaf in _ATTN_LEAVES for param in ("weight", "bias")}
    if kind == "vq":
        expected.add("quantize.embedding.weight")
    return expected


def _check_structure(compvis_sd: Mapping[str, torch.Tensor], kind: str, n_levels: int,
                     name_in_source) -> None:
    """Raise naming missing / misplaced keys (in the caller's naming via name_in_source)."""
    keys = set(compvis_sd)
    expected = _expected_compvis_keys(compvis_sd, kind, n_levels)
    missing, extra = expected - keys, keys - expected
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} key(s): {_format_list(name_in_source(k) for k in missing)}")
    if extra:
        problems.append(f"{len(extra)} key(s) that the structure does not have (e.g. a downsampler after the "
                        f"last level): {_format_list(name_in_source(k) for k in extra)}")
    if problems:
        raise CheckpointKeyError(f"incomplete CompVis {kind.upper()} first stage with {n_levels} levels: "
                                 + "; ".join(problems))


def _attn_to_linear(key: str, tensor: torch.Tensor) -> torch.Tensor:
    """(C, C, 1, 1) 1x1-conv kernel -> (C, C) linear weight."""
    if tensor.ndim != 4 or tensor.shape[2:] != (1, 1):
        raise UserError(f"{key}: expected a 1x1 conv kernel of shape (C, C, 1, 1), got {tuple(tensor.shape)}")
    return tensor.reshape(tensor.shape[0], tensor.shape[1])


def _attn_to_conv(key: str, tensor: torch.Tensor) -> torch.Tensor:
    """(C, C) linear weight -> (C, C, 1, 1) 1x1-conv kernel."""
    if tensor.ndim != 2:
        raise UserError(f"{key}: expected a linear weight of shape (C, C), got {tuple(tensor.shape)}")
    return tensor.reshape(tensor.shape[0], tensor.shape[1], 1, 1)


def _is_attn_projection_weight(compvis_key: str) -> bool:
    return bool(re.search(r"\.(mid\.attn_1|attn\.\d+)\.(q|k|v|proj_out)\.weight$", compvis_key))


def compvis_to_diffusers_first_stage(state_dict: Mapping[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """CompVis first-stage weights -> diffusers VQModel ('vq') / AutoencoderKL ('kl') weights.

    state_dict: the `first_stage_model.*` entries of a CompVis LDM checkpoint, with or without that
    prefix, or a stand-alone first-stage checkpoint's state dict (its `loss.*` entries are dropped).
    Tensors are passed through (attention projections as reshaped views). Raises ValueError for an
    unknown kind or keys no rule knows, KeyError for missing keys, both naming the keys.
    """
    _check_kind(kind)
    sd = _strip_prefix(state_dict)
    n_levels = _n_levels(sd, r"(?:encoder\.down|decoder\.up)\.(\d+)\.", "encoder.down.* / decoder.up.*")
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in sd.items():
        new = _translate(key, "compvis", "diffusers", n_levels, kind)
        if new is None:
            unknown.append(key)
            continue
        out[new] = _attn_to_linear(key, tensor) if _is_attn_projection_weight(key) else tensor
    if unknown:
        raise UserError(f"{len(unknown)} key(s) of the CompVis {kind.upper()} first stage match no CompVis "
                         f"Encoder/Decoder/quant_conv/post_quant_conv"
                         f"{'/quantize.embedding' if kind == 'vq' else ''} parameter: {_format_list(unknown)}")
    _check_structure(sd, kind, n_levels, name_in_source=lambda k: k)
    return out


def diffusers_to_compvis_first_stage(state_dict: Mapping[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """diffusers VQModel ('vq') / AutoencoderKL ('kl') weights -> CompVis first-stage weights (no prefix).

    Refuses what the CompVis modules do not have (e.g. an AutoencoderKL without quant convs).
    """
    _check_kind(kind)
    n_levels = _n_levels(state_dict, r"(?:encoder\.down_blocks|decoder\.up_blocks)\.(\d+)\.",
                         "encoder.down_blocks.* / decoder.up_blocks.*")
    out: dict[str, torch.Tensor] = {}
    back: dict[str, str] = {}
    unknown = []
    for key, tensor in state_dict.items():
        new = _translate(key, "diffusers", "compvis", n_levels, kind)
        if new is None:
            unknown.append(key)
            continue
        back[new] = key
        out[new] = _attn_to_conv(key, tensor) if _is_attn_projection_weight(new) else tensor
    if unknown:
        raise UserError(f"{len(unknown)} key(s) of the diffusers {'VQModel' if kind == 'vq' else 'AutoencoderKL'} "
                         f"have no CompVis counterpart: {_format_list(unknown)}")

    def diffusers_name(compvis_key: str) -> str:
        return back.get(compvis_key) or _translate(compvis_key, "compvis", "diffusers", n_levels, kind) or compvis_key

    _check_structure(out, kind, n_levels, name_in_source=diffusers_name)
    return out


def compvis_key_to_diffusers(key: str, kind: str, n_levels: int) -> str | None:
    """One CompVis first-stage key (no prefix) -> its diffusers name, None if it has none."""
    _check_kind(kind)
    return _translate(key, "compvis", "diffusers", n_levels, kind)


def diffusers_key_to_compvis(key: str, kind: str, n_levels: int) -> str | None:
    """One diffusers VQModel/AutoencoderKL key -> its CompVis name, None if it has none."""
    _check_kind(kind)
    return _translate(key, "diffusers", "compvis", n_levels, kind)
