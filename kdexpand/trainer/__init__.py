"""The Accelerate trainer, split into set-up, training step, evaluation, checkpoints and finish."""

from kdexpand.trainer.evaluate import evaluate
from kdexpand.trainer.finish import ContractionError, contract_checked, finish_run
from kdexpand.trainer.run import run, train_stage
from kdexpand.trainer.setup import RunContext, RunDirectoryError, setup_run
from kdexpand.trainer.step import LossCheckError, nonfinite_parts, train_epoch

__all__ = [
    "ContractionError",
    "LossCheckError",
    "RunContext",
    "RunDirectoryError",
    "contract_checked",
    "evaluate",
    "finish_run",
    "nonfinite_parts",
    "run",
    "setup_run",
    "train_epoch",
    "train_stage",
]
