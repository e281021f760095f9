"""Data: text corpora cached in tensorstore, synthetic tasks, deterministic batch streams."""

from jaxsparse.data.stream import Shard, SyntheticStream, TextStream, make_stream

__all__ = ["Shard", "SyntheticStream", "TextStream", "make_stream"]
