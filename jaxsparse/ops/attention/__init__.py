"""Attention ops: ``dot_product_attention`` (dense reference, block-sparse) and decoding."""

from jaxsparse.ops.attention.api import IMPLEMENTATIONS, dot_product_attention
from jaxsparse.ops.attention.decode import (decode_attention, full_cache_decode,
                                            window_cache_decode)

__all__ = ["IMPLEMENTATIONS", "decode_attention", "dot_product_attention", "full_cache_decode",
           "window_cache_decode"]
