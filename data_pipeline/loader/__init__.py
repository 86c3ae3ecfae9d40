"""The streaming training loader: shards → batches with an exact, resumable position per rank.

sources.py lists datasets and shards (local or object store) → plan.py assigns each epoch's shards to ranks and
workers → tarstream.py reads samples from a shard stream → decode.py turns them into tensors (images through the
shared ``data_pipeline.image`` codec, audio through melspec.py) → batchring.py hands batches over in shared memory →
stream.py is the ``Loader`` that training iterates. Importing the package imports no torch (``build_loader`` and
``Loader`` load stream.py on first use).
"""

__all__ = ["Loader", "build_loader"]


def __getattr__(name: str):
    if name in __all__:
        from data_pipeline.loader import stream

        return getattr(stream, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
