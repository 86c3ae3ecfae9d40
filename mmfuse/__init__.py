"""mmfuse: an open pipeline for pre-training image-text-audio models. This package is the front door only: the
``mmfuse`` command (cli.py) and the one config loader (config.py)."""

__version__ = "0.1.0"
