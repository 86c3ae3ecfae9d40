"""Fine-tuning tasks, one module each, looked up by name in ``TASKS``.

The registry below is the only list of task names (config validation and help ask it); a task's module, and
torch with it, is imported when the task is first built.
"""

from mmfuse.registry import Registry

TASKS = Registry("task")
TASKS.add("zeroshot", "finetune.tasks.zeroshot:ZeroShot")
TASKS.add("retrieval", "finetune.tasks.retrieval:Retrieval")
TASKS.add("caption", "finetune.tasks.caption:Caption")
TASKS.add("vqa", "finetune.tasks.vqa:build_vqa")
TASKS.add("classify", "finetune.tasks.classify:Classify")

__all__ = ["TASKS", "Task", "TaskContext", "build_task"]


def build_task(cfg, backbone, context):
    """The task ``cfg.task`` names, around ``backbone``."""
    TASKS.check(cfg.task, "task")
    return TASKS[cfg.task](cfg, backbone, context)


def __getattr__(name: str):
    if name in ("Task", "TaskContext"):
        from finetune.tasks import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
