"""Training: TrainConfig (every option), Trainer (the loop, checkpoints, resume, DDP), schedules.

``saefast.training.build`` turns a TrainConfig into an SAE and an activation source;
``saefast.cli`` is the command line on top.
"""
from .config import TrainConfig
from .schedule import WarmupCosine, make_scheduler
from .trainer import Trainer, TrainingDiverged, evaluate_run

__all__ = ["TrainConfig", "Trainer", "TrainingDiverged", "evaluate_run", "WarmupCosine", "make_scheduler"]
