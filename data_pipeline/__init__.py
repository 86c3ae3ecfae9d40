"""Data stages: synthetic data, sharding raw pairs into WebDataset shards, verification, the preflight checks of
every stage's inputs and outputs, and the streaming training loader. Never imports torch at import time."""
