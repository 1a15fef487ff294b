"""What a server's blocks cost and how many fit: the KV cache bytes of a token (computed, then checked against what
a session's cache really allocates, on every family), the blocks that fit a memory limit, `--max-memory` sizes."""

import pytest
import torch

from petald.config import ConfigError, parse_memory
from petald.models.checkpoints import TINY_FAMILIES
from petald.models.loading import load_config
from petald.serving.kv import MIN_CAPACITY
from petald.serving.span import Span, blocks_within_memory, kv_bytes_per_token


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_kv_bytes_per_token_are_what_a_session_allocates(tiny_family, family: str) -> None:
    path = tiny_family(family)
    config = load_config(path)
    span = Span.load(path, 0, 2)
    session = span.new_session(2, 64)
    hidden = torch.randn(2, MIN_CAPACITY, span.hidden_size, generator=torch.Generator().manual_seed(0))
    span.step(session, hidden)  # the first step allocates MIN_CAPACITY tokens for each row, in each block
    assert session.cache.nbytes() == 2 * MIN_CAPACITY * 2 * kv_bytes_per_token(config)


def test_blocks_within_memory_count_weights_and_their_share_of_the_cache() -> None:
    assert blocks_within_memory(block_bytes=100, cache_bytes_per_block=50, max_memory=1000) == 6
    assert blocks_within_memory(block_bytes=100, cache_bytes_per_block=50, max_memory=149) == 0
    assert blocks_within_memory(block_bytes=100, cache_bytes_per_block=0, max_memory=100) == 1


def test_memory_sizes_parse_with_decimal_and_binary_units() -> None:
    assert parse_memory("1000") == 1000
    assert parse_memory("1.5GB") == 1_500_000_000
    assert parse_memory("800 MiB") == 800 * 2**20
    assert parse_memory("2gib") == 2 * 2**30
    assert parse_memory("64kB") == 64_000
    for bad in ("", "GB", "1.5 parsecs", "-1GB", "0", "nan", "1e400GB"):
        with pytest.raises(ConfigError, match="max_memory"):
            parse_memory(bad)


def test_max_memory_chooses_as_many_blocks_as_fit_and_checks_pinned_blocks(tiny_llama) -> None:
    from petald.config import NodeConfig
    from petald.node import fit_to_memory
    from petald.serving.span import block_weight_bytes

    config = load_config(tiny_llama)  # 6 blocks
    cache = 1000 * kv_bytes_per_token(config)
    fp32, nf4 = block_weight_bytes(config, "none"), block_weight_bytes(config, "nf4")
    node = NodeConfig(model=str(tiny_llama), max_cache_tokens=1000, new_swarm=True)

    def chosen(**options) -> int | None:
        return fit_to_memory(NodeConfig(**{**node.__dict__, **options}), config, 6).num_blocks

    limit = 3 * (fp32 + cache)
    assert chosen(max_memory=str(limit)) == 3
    assert chosen(max_memory=str(limit - 1)) == 2
    assert chosen(max_memory=str(limit), quant="nf4") == limit // (nf4 + cache) > 3  # quantized blocks cost less
    assert chosen(max_memory=str(limit), num_blocks=2) == 2  # --num-blocks caps it
    assert chosen(max_memory="1GB") == 6  # never more than the model has
    assert chosen(num_blocks=4) == 4  # no --max-memory: unchanged
    assert chosen(max_memory=str(limit), blocks="1:4") is None  # pinned blocks that fit: unchanged
    with pytest.raises(ConfigError, match=r"blocks 0:4 do not fit in max_memory .*KV cache \(max_cache_tokens 1000\)"):
        chosen(max_memory=str(limit), blocks="0:4")
    with pytest.raises(ConfigError, match="max_memory 1kB holds no block: a block takes"):
        chosen(max_memory="1kB")
