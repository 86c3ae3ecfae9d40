"""Data stages, in two rooms: ``shard/`` packs raw pairs into WebDataset shards (``mmfuse shard``, ``mmfuse
verify``), ``loader/`` streams shards into training batches. Shared by both: the config (config.py), the per-sample
error protocol (errors.py), the media codecs (image.py, audio.py, text.py) and the preflight checks of every stage's
inputs and outputs (preflight.py). Beside them: the synthetic shapes world (synth.py, ``mmfuse synth``) and
``mmfuse inspect`` (inspect.py, inspect_page.py). Never imports torch at import time."""
