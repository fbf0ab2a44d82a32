"""Tasks: the data, model, loss and metrics of one kind of problem, behind one interface."""

from kdexpand.registry import Registry
from kdexpand.tasks.base import Task
from kdexpand.tasks.classification import ClassificationTask

__all__ = ["TASKS", "ClassificationTask", "Task", "build_task"]

TASKS: Registry[type[Task]] = Registry("task")
TASKS.register("classification")(ClassificationTask)


def build_task(recipe) -> Task:
    """Build the task that ``recipe.task`` names, without loading its data yet."""
    return TASKS.get(recipe.task)(recipe)
