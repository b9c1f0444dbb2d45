"""Run by tests/test_train.py: for each config of a JSON list, 3 optimizer steps on fixed batches,
either as one of 2 torchrun ranks (each takes its half of every batch) or as one process
accumulating the two halves. One process group serves every config (start-up dominates)."""

import json
import sys
from pathlib import Path

import torch

from cfrobust.shards.experiments import DataExperiment
from cfrobust.shards.reader import collate, iter_samples
from cfrobust.trainer.config import TrainConfig
from cfrobust.distributed import setup_distributed, teardown_distributed
from cfrobust.trainer.objective import Objective
from cfrobust.trainer.optim import Schedule, make_optimizer
from cfrobust.trainer.train import Precision, TrainingParts, make_model, optimizer_step


def three_steps(config: TrainConfig, env) -> dict:
    samples = list(iter_samples(sorted(Path(config.shards, "train").glob("*.tar")), [config.cf]))
    experiment = DataExperiment(config.seed, config.data_ratio, config.box_fraction, config.bbox_noise)
    samples = [experiment.apply(s) for s in samples]  # --box-fraction: boxes fall unevenly on the ranks
    size = config.batch * env.world_size  # the global batch
    batches = [collate(samples[i * size : (i + 1) * size]) for i in range(3)]
    model, wrapped = make_model(config, 2, env)
    optimizer = make_optimizer(model, config)
    parts = TrainingParts(wrapped, Objective(config, num_classes=2), optimizer, Schedule(optimizer, config, 3),
                          Precision("32", env.device), torch.Generator(), env, config)
    for batch in batches:
        mine = batch.chunks(env.world_size)[env.rank]  # a single process keeps the whole batch
        optimizer_step(parts, mine)
    return {k: v for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}


env = setup_distributed("cpu")
for index, options in enumerate(json.loads(sys.argv[1])):
    weights = three_steps(TrainConfig(**options), env)
    torch.save(weights, f"{sys.argv[2]}/{index}-world{env.world_size}-rank{env.rank}.pt")
teardown_distributed()
