"""Fine-tuning tasks, one module each, found by name through the registry."""

from finetune.tasks import caption, classify, retrieval, vqa, zeroshot  # noqa: F401  (registration)
from finetune.tasks.base import TASKS, Task, TaskContext, build_task

__all__ = ["TASKS", "Task", "TaskContext", "build_task"]
