"""Training: TrainConfig (every option), Trainer (the loop, checkpoints, resume, DDP), schedules.

``saefast.training.build`` turns a TrainConfig into an SAE and an activation source;
``run_folder`` owns the run folder, ``metrics_log`` the metrics, ``evaluate`` the evals;
``saefast.cli`` is the command line on top.
"""
from .config import TrainConfig
from .evaluate import evaluate_run
from .run_folder import RunFolder
from .schedule import WarmupCosine, make_scheduler
from .trainer import Trainer, TrainingDiverged

__all__ = ["TrainConfig", "Trainer", "TrainingDiverged", "RunFolder", "evaluate_run", "WarmupCosine",
           "make_scheduler"]
