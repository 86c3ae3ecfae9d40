"""Failure of one sample, with the reason it is counted under."""


class SampleError(Exception):
    """One sample cannot be written. ``reason`` is a short stable identifier (``http_404``, ``image_too_large``)
    that goes into the shard parquet and the stats counts; the message is detail for humans."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
