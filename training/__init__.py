"""Training a class-conditional denoiser (scripts/train.py): the loop, the ADM/DiT loss, EMA, checkpoints."""
