"""Kept KV caches stay within their byte limit, least recently used out first."""
from __future__ import annotations

import torch
from transformers import DynamicCache

from vidmem.agents.kept import KeptCaches, cache_bytes


def _cache(tokens: int, layers: int = 2, heads: int = 2, dim: int = 16) -> DynamicCache:
    cache = DynamicCache()
    for layer in range(layers):
        kv = torch.zeros(1, heads, tokens, dim, dtype=torch.float32)  # (batch, heads, tokens, head dim)
        cache.update(kv, kv.clone(), layer)
    return cache


def test_a_cache_is_measured_by_its_tensors():
    assert cache_bytes(_cache(100)) == 2 * 2 * (2 * 100 * 16 * 4)  # layers x (keys, values) x bytes


def test_the_least_recently_used_caches_go_first_once_past_the_limit():
    one = cache_bytes(_cache(100))
    kept = KeptCaches(max_bytes=3 * one)
    for name in ("a", "b", "c"):
        kept[name] = _cache(100)
    assert kept.get("a") is not None  # touched: now the most recent
    kept["d"] = _cache(100)
    assert "b" not in kept and {"a", "c", "d"} <= set(kept) and kept.bytes <= 3 * one
    kept[("conversation", ("cam",), "x")] = _cache(250)  # a big one pushes out as many as needed
    assert kept.bytes <= 3 * one and kept.evicted >= 2
    alone = KeptCaches(max_bytes=one // 2)
    alone["big"] = _cache(100)  # the newest stays even alone over the limit: its question must be answerable
    assert "big" in alone


def test_nothing_grows_with_the_number_of_streams_seen():
    kept = KeptCaches(max_bytes=10 * cache_bytes(_cache(10)))
    for i in range(500):
        kept[f"camera-{i}"] = _cache(10)
    assert len(kept) == 10
