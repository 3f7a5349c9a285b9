"""Native LDM (CompVis latent-diffusion): U-Net and first-stage loading."""
