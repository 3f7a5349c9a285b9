"""The Hydra job layer: a sampling run from a composed config (native models: run.py, diffusers
pipelines: pipeline_run.py), its batches (generate.py), the run folder (resume, lock, outputs at the
end: collect.py), several processes (distributed.py), W&B, speed settings, and MACs of a configured run."""
