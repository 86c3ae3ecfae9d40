"""mmfuse: an open pipeline for pre-training image-text-audio models. This package is the front door and the
runtime every stage shares: the ``mmfuse`` command (cli.py), the one config loader (config.py), name registries
(registry.py), local launching (launch.py), storage (storage.py: fsspec, atomic writes), the checkpoint commit
protocol (commits.py), metrics tracking (tracking.py), logging (logs.py), progress (progress.py), credential
redaction (redact.py), plots and the allocator setting. Importing it imports no torch."""

import functools

__version__ = "0.1.0"


@functools.cache  # the code a process runs does not change under it: asked once, not at every checkpoint
def code_version() -> str:
    """``__version__``, plus the git commit (and ``.dirty``) when the code runs from a checkout: recorded in
    checkpoints and releases, so a result can be traced to the code that made it."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return __version__
    return f"{__version__}+g{commit}{'.dirty' if dirty else ''}" if commit else __version__
