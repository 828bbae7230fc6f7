"""Tasks: seeded generators of token sequences with exact formats, and their scorers.

Importing this package registers the built-in tasks: rule110, depo, gsm_infinite, mqar.
"""

from archkit.tasks.base import (
    Accuracy,
    Score,
    Split,
    Task,
    TaskBatch,
    TaskConfig,
    get_task,
    predictions_from_logits,
    show,
)
from archkit.tasks.depo import Depo
from archkit.tasks.gsm_infinite import GsmInfinite
from archkit.tasks.mqar import Mqar
from archkit.tasks.rule110 import Rule110

__all__ = [
    "Accuracy",
    "Depo",
    "GsmInfinite",
    "Mqar",
    "Rule110",
    "Score",
    "Split",
    "Task",
    "TaskBatch",
    "TaskConfig",
    "get_task",
    "predictions_from_logits",
    "show",
]
