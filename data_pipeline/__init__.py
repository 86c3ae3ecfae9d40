"""Data stages: synthetic data, sharding raw pairs into WebDataset shards, verification (and, later, the
streaming training loader). Never imports torch at import time."""
