"""Training: temperature schedules and a small trainer with exact resume."""

from l2b_fast.train.schedules import from_config as schedule_from_config
from l2b_fast.train.trainer import TensorTaskData, TrainConfig, Trainer
from l2b_fast.train.stream import Evaluation, StreamConfig, StreamTrainer
from l2b_fast.train.distributed import DistContext

__all__ = ["DistContext", "Evaluation", "StreamConfig", "StreamTrainer", "TensorTaskData", "TrainConfig", "Trainer", "schedule_from_config"]
