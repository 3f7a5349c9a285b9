"""The model pairs the demo offers: each one a set of Hydra overrides of configs/sample.yaml.

A pair is data, not code: adding one (an LDM-S -> LDM or SD -> SDXL pair once their configs
exist) is one more `ModelPair` in `PAIRS`. Each names

* the overrides that compose it (an experiment, usually a T-Stitch one: `+exp=...`),
* where the user's weights go (`weights`: slot -> config key, e.g. "large" -> `model.ckpt`;
  a path or a hub id typed in the page is passed as that override, blank keeps the config's),
* the config files it needs (`requires`): a pair whose files are not in this checkout is still
  listed, and choosing it says what is missing instead of failing somewhere deep in a run,
* page defaults (steps, guidance, T-GATE step, labels or prompt), and how quality is measured.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from diffusion.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "configs"

# what each weight slot means, shown as the text box labels
SLOT_LABELS = {
    "large": "large model weights (path or hub id)",
    "small": "small model weights (path or hub id)",
    "first_stage": "VAE / first stage (path or hub id)",
}


@dataclass(frozen=True)
class ModelPair:
    key: str                       # short id, used by tests and the command line
    label: str                     # shown in the dropdown
    overrides: tuple[str, ...]     # Hydra overrides that compose the pair (T-Stitch on)
    weights: dict[str, str]        # slot ("large", "small", "first_stage") -> config key
    requires: tuple[str, ...] = () # config files (relative to configs/) the pair needs
    needs: str = ""                # what provides the missing files, for the message
    conditioning: str = "class"    # "class" (labels) or "text" (prompt)
    prompt_key: str = "prompts"    # text pairs: the config key of the prompt list
    num_classes: int = 1000
    sampler: str = "ddim"
    steps: int = 50
    cfg_scale: float = 1.5
    fraction: float = 0.4
    gate_step: int = 30            # T-GATE defaults for `steps`
    sp_interval: int = 3
    fi_interval: int = 1
    warm_up: int = 2
    tgate_branch: str = "cond"     # class-conditional DiT: cond; text models: uncond (the reference's)
    tgate_accel: str = "[tstitch,tgate]"  # the techniques of T-Stitch with T-GATE (configs/accel/)
    labels: str = ""
    prompt: str = ""
    num_samples: int = 4
    max_batch: int = 8             # images per forward batch (samples do not depend on it; memory does)
    quality: str | None = None     # "digits": classifier agreement (evaluation/digits.py)
    note: str = ""
    defaults_hint: dict[str, str] = field(default_factory=dict)  # slot -> what blank means

    def missing_configs(self) -> list[str]:
        return [name for name in self.requires if not (CONFIGS / name).is_file()]

    def availability_error(self) -> str | None:
        """Why the pair cannot run in this checkout, or None."""
        missing = self.missing_configs()
        if not missing:
            return None
        return (f"The pair '{self.label}' is not in this build: it needs "
                f"{', '.join('configs/' + m for m in missing)}{' (' + self.needs + ')' if self.needs else ''}.")


PAIRS: dict[str, ModelPair] = {p.key: p for p in [
    ModelPair(
        key="digits",
        label="digits: DiT-digits-S -> DiT-digits-L (shipped, CPU)",
        overrides=("+exp=digits_stitch_0.4",),
        weights={"large": "model.ckpt", "small": "family.stitch.small.ckpt"},
        requires=("exp/digits_stitch_0.4.yaml",),
        num_classes=10, sampler="ddim", steps=50, cfg_scale=1.5, fraction=0.4,
        gate_step=30, sp_interval=3, fi_interval=1, warm_up=2,
        labels="0, 1, 2, 3, 4, 5, 6, 7, 8, 9", num_samples=10, max_batch=500, quality="digits",
        note="The pair trained on scikit-learn's 8x8 digits and shipped in checkpoints/digits/: "
             "seconds per click on a CPU.",
        defaults_hint={"large": "checkpoints/digits/digits_l.pt", "small": "checkpoints/digits/digits_s.pt"},
    ),
    ModelPair(
        key="dit",
        label="ImageNet 256: DiT-S/2 -> DiT-XL/2",
        overrides=("+exp=dit_stitch_0.4",),
        weights={"large": "model.ckpt", "small": "family.stitch.small.ckpt", "first_stage": "vae.source"},
        requires=("exp/dit_stitch_0.4.yaml",),
        num_classes=1000, sampler="ddim", steps=20, cfg_scale=1.5, fraction=0.4,
        gate_step=12, sp_interval=3, fi_interval=1, warm_up=2,
        labels="207, 360, 387, 974", num_samples=4,
        note="Official DiT-XL/2 and T-Stitch's DiT-S/2 (dit_s_256.pt); slow on a CPU (minutes per click).",
        defaults_hint={"large": "DiT-XL-2-256x256.pt from the torch hub cache",
                       "small": "pretrained_models/dit_s_256.pt",
                       "first_stage": "stabilityai/sd-vae-ft-mse from the Hugging Face cache"},
    ),
    ModelPair(
        key="ldm",
        label="ImageNet 256: LDM-S -> LDM (U-Net)",
        overrides=("+exp=ldm_stitch_0.4",),
        weights={"large": "model.ckpt", "small": "family.stitch.small.ckpt"},
        requires=("exp/ldm_stitch_0.4.yaml",),
        needs="the native LDM U-Net",
        num_classes=1000, sampler="ddim", steps=20, cfg_scale=3.0, fraction=0.4,
        gate_step=12, sp_interval=3, fi_interval=1, warm_up=2, tgate_branch="cond",
        labels="207, 360, 387, 974", num_samples=4,
        note="T-Stitch's LDM-S and LDM (CompVis .ckpt files; the VQ-f8 first stage comes from the large one's). "
             "Slow on a CPU.",
        defaults_hint={"large": "none: give T-Stitch's LDM .ckpt", "small": "pretrained_models/ldm_s_cin256.ckpt"},
    ),
    ModelPair(
        key="sdxl",
        label="text: SSD-1B -> SDXL",
        overrides=("+exp=sdxl_ssd1b_stitch_0.4",),
        weights={"large": "model.source", "small": "family.stitch.small.source"},
        requires=("exp/sdxl_ssd1b_stitch_0.4.yaml",),
        needs="the diffusers pipelines",
        conditioning="text", sampler="pipeline", steps=25, cfg_scale=5.0,
        fraction=0.4,
        gate_step=10, sp_interval=5, fi_interval=1, warm_up=2, tgate_branch="uncond",
        prompt="an astronaut riding a horse, photograph", num_samples=1,
        note="diffusers pipelines given by hub id or local folder; needs a GPU in practice.",
        defaults_hint={"large": "the config's hub id", "small": "the config's hub id"},
    ),
    ModelPair(
        key="sd",
        label="text: SD 1.x stitched (T-Stitch's SD setting)",
        overrides=("+exp=sd_stitch_0.3",),
        weights={"large": "model.source", "small": "family.stitch.small.source"},
        requires=("exp/sd_stitch_0.3.yaml",),
        needs="the diffusers pipelines",
        conditioning="text", sampler="pipeline", steps=25, cfg_scale=7.5,
        fraction=0.3,
        gate_step=10, sp_interval=5, fi_interval=1, warm_up=2, tgate_branch="uncond",
        prompt="a photograph of an astronaut riding a horse", num_samples=1,
        note="diffusers pipelines given by hub id or local folder; needs a GPU in practice.",
        defaults_hint={"large": "the config's hub id", "small": "the config's hub id"},
    ),
]}

DEFAULT_PAIR = "digits"


def get_pair(key_or_label: str) -> ModelPair:
    """A pair by key or by its dropdown label; unknown names say which exist."""
    for pair in PAIRS.values():
        if key_or_label in (pair.key, pair.label):
            return pair
    raise UserError(f"unknown model pair {key_or_label!r}; known: {', '.join(PAIRS)}")
