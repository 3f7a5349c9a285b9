"""A tiny diffusers pipeline whose loop makes classifier-free guidance as one batched U-Net call or as
two separate passes per loop entry (unconditional, then conditional), as many newer pipelines do
(Wan, Chroma, QwenImage): a stock-shaped loop that calls its denoiser twice per step.

It takes the text embeddings directly (no tokenizer, no text encoder) and runs with any scheduler
the step-tracker tests use: DDIM-type ones and flow matching alike (`scale_model_input` and
`init_noise_sigma` only where the scheduler has them). Its progress bar moves as diffusers'
pipelines move theirs.
"""
from __future__ import annotations

import inspect

import torch
from diffusers import DiffusionPipeline


class LoopPipeline(DiffusionPipeline):
    def __init__(self, unet, scheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @torch.no_grad()
    def __call__(self, prompt_embeds: torch.Tensor, negative_prompt_embeds: torch.Tensor, num_inference_steps: int = 6,
                 guidance_scale: float = 5.0, passes: int = 1, generator: torch.Generator | None = None):
        """Latents (B, 4, 8, 8) after the loop; passes: 1 = the CFG batch in one call, 2 = two calls."""
        if passes not in (1, 2):
            raise ValueError(f"passes={passes!r}: must be 1 or 2")
        batch = prompt_embeds.shape[0]
        self.scheduler.set_timesteps(num_inference_steps)
        timesteps = self.scheduler.timesteps
        warmup = max(len(timesteps) - num_inference_steps * self.scheduler.order, 0)
        sigma = getattr(self.scheduler, "init_noise_sigma", 1.0)
        latents = torch.randn(batch, 4, 8, 8, generator=generator) * sigma
        scale = getattr(self.scheduler, "scale_model_input", lambda x, t: x)
        # as diffusers' pipelines do: a generator for the schedulers that draw noise in their step (LCM)
        extra = {"generator": generator} if "generator" in inspect.signature(self.scheduler.step).parameters else {}
        with self.progress_bar(total=num_inference_steps) as bar:
            for i, t in enumerate(timesteps):
                x = scale(latents, t)
                if passes == 1:
                    both = self.unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat(
                        [negative_prompt_embeds, prompt_embeds])).sample
                    uncond, cond = both.chunk(2)
                else:
                    uncond = self.unet(x, t, encoder_hidden_states=negative_prompt_embeds).sample
                    cond = self.unet(x, t, encoder_hidden_states=prompt_embeds).sample
                guided = uncond + guidance_scale * (cond - uncond)
                latents = self.scheduler.step(guided, t, latents, **extra).prev_sample
                if i == len(timesteps) - 1 or ((i + 1) > warmup and (i + 1) % self.scheduler.order == 0):
                    bar.update()
        return latents
