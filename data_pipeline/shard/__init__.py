"""The sharding stage (``mmfuse shard``): raw pairs → WebDataset shards, as a recipe in stage.py.

readers.py lists the input rows (parquet, CSV, JSONL, folders, img2dataset output) → fetchers.py gets their media
(local, http, object stores) → the shared codecs process them (``data_pipeline.image`` / ``audio`` / ``text``) →
worker.py does one shard → writer.py writes it with its commit protocol; distributor.py maps shards over processes or
a SLURM array. verify.py checks a finished dataset (``mmfuse verify``); idx.py converts IDX files (Fashion-MNIST).
Nothing here imports torch.
"""
