"""Pre-training under DeepSpeed ZeRO: the multimodal model (open_clip/timm towers, fusion, decoders), contrastive
and masked objectives, the trainer with exact resume, checkpoints and their sync, and the release export.

``mmfuse pretrain --config configs/pretrain/tiny.yaml data.train=SHARDS run.dir=RUN`` trains; ``mmfuse export RUN``
writes the release. See docs/pretrain.md. Importing the package imports no torch (config errors come back fast).
"""
