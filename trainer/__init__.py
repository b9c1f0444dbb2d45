"""Models, the training objectives (CF, F, saliency), the DDP loop, checkpoints and evaluation.

Nothing here imports torch at package import time, so the CLI can read `TrainConfig` cheaply.
"""
