"""Training: one trainer for search and retrain (any data source, one process or many), schedules, checkpoints."""

from l2b_fast.data.tensors import TensorTaskData
from l2b_fast.train.distributed import DistContext
from l2b_fast.train.schedules import from_config as schedule_from_config
from l2b_fast.train.trainer import Evaluation, StreamConfig, StreamTrainer, TrainConfig, Trainer

__all__ = [
    "DistContext",
    "Evaluation",
    "StreamConfig",
    "StreamTrainer",
    "TensorTaskData",
    "TrainConfig",
    "Trainer",
    "schedule_from_config",
]
