"""Run by tests/test_train.py under torchrun: train, then save this rank's final weights."""

import json
import sys

import torch

from cfrobust.trainer.config import TrainConfig
from cfrobust.distributed import setup_distributed, teardown_distributed
from cfrobust.trainer.train import train_in

config = TrainConfig(**json.loads(sys.argv[1]))
env = setup_distributed("cpu")
document, model = train_in(env, config)
torch.save({"state": model.state_dict(), "document": document}, f"{sys.argv[2]}/rank{env.rank}.pt")
teardown_distributed()
