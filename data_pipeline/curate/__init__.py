"""``mmfuse curate``: decide which samples of a sharded dataset to train on, without rewriting its shards.

scan (per shard: key, content hash, perceptual hash, caption) → filters (caption rules, exact and near-duplicate
images; each dropped sample gets one reason) → ``OUT/index.parquet`` (shard, position, key, kept, reason, scores),
which ``data.keep=OUT`` applies to the original shards in the training loader. Model-based scores (image-text
similarity from a release) are the next filters (issue 18).
"""
