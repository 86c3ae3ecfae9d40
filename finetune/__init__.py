"""Fine-tuning and evaluation of released checkpoints: zero-shot, retrieval, captioning, VQA, classification.

``mmfuse finetune --config configs/finetune/<task>.yaml checkpoint=RELEASE data.train=... data.eval=... run.dir=RUN``
trains and evaluates; ``mmfuse eval`` (same config) only evaluates. See docs/finetune.md.
"""
