"""Token data: the shard format and loaders (shards.py), text tokenization (tokenize_text.py),
the CPU demo dataset (prepare_demo_data.py) and the FineWeb download (cached_fineweb10B.py)."""

from data.shards import (
    GPT2_BOS_ID,
    GPT2_VOCAB_SIZE,
    DistributedTokenLoader,
    ShardFormatError,
    ShardsNotFoundError,
    iter_val_batches,
    list_shards,
    read_header,
    read_shard,
    unigram_cross_entropy,
    write_shard,
)

__all__ = [
    "GPT2_BOS_ID", "GPT2_VOCAB_SIZE", "DistributedTokenLoader", "ShardFormatError", "ShardsNotFoundError",
    "iter_val_batches", "list_shards", "read_header", "read_shard", "unigram_cross_entropy", "write_shard",
]
