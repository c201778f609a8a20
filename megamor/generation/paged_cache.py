"""Paged K/V cache: one pool of fixed-size pages shared by every (sequence, cache layer).

A *cache layer* is an unrolled layer that stores K/V: every layer with recursion-wise caching
(the prelude and coda layers, and each recursion step's layers of the shared block: step r's
cache holds only the tokens that reached step r), or, with recursive KV sharing, only the layers
outside the block and those of step 1 (later steps read step 1's pages of the same slot).

Each (sequence slot, cache layer) owns a list of pages (its page table) and a length; a page holds
`block_size` consecutive entries of that list. Entries are appended in position order, so a
cache of n entries occupies ceil(n / block_size) pages wherever they lie in the pool: ragged
lengths, a token skipped by a recursion step, or a finished sequence whose pages return to the
free list at once cost no padding beyond the last page of each list.

Host bookkeeping (page tables, lengths, free list) is numpy; the pool itself is two torch tensors
[pages, block_size, kv_heads, head_dim] (K and V). Page 0 is a zero page that padded table
entries point at. The pool grows geometrically up to `max_bytes` (None: no limit); the scheduler
asks `pages_free()` before a step and preempts a sequence when a step might not fit.
"""

from __future__ import annotations

import numpy as np
import torch


class CacheFull(RuntimeError):
    """More pages were asked for than the budget holds (the scheduler prevents this)."""


class PagedKVCache:
    def __init__(self, num_cache_layers: int, max_slots: int, max_len: int, block_size: int,
                 kv_heads: int, head_dim: int, dtype: torch.dtype = torch.float32,
                 max_bytes: int | None = None, initial_pages: int = 64):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.kv_heads, self.head_dim, self.dtype = kv_heads, head_dim, dtype
        self.num_layers = num_cache_layers
        self.max_pages_per_list = -(-max_len // block_size)
        elem = torch.empty((), dtype=dtype).element_size()
        self.entry_bytes = 2 * kv_heads * head_dim * elem  # K and V of one token in one layer
        self.page_bytes = self.entry_bytes * block_size
        self.max_pages = None if max_bytes is None else int(max_bytes // self.page_bytes)
        if self.max_pages is not None and self.max_pages < 2:
            raise ValueError(f"a KV budget of {max_bytes} bytes holds fewer than 2 pages of "
                             f"{self.page_bytes} bytes")
        self.table = np.zeros((max_slots, num_cache_layers, self.max_pages_per_list), np.int64)
        self.length = np.zeros((max_slots, num_cache_layers), np.int64)
        n = initial_pages if self.max_pages is None else min(initial_pages, self.max_pages)
        self.k = torch.zeros(n, block_size, kv_heads, head_dim, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self._free = list(range(n - 1, 0, -1))  # stack; page 0 is the zero page
        self.pages_used = 0
        self.peak_pages = 0
        self.entries = 0
        self.peak_entries = 0
        self.appended = 0  # entries ever appended

    # ------------------------------------------------------------------ capacity

    @property
    def num_pages(self) -> int:
        return self.k.shape[0]

    def pages_free(self) -> int:
        """Pages that can still be handed out (free now, or by growing within the budget)."""
        if self.max_pages is None:
            return 1 << 62
        return len(self._free) + self.max_pages - self.num_pages

    def pages_needed(self, slot: int, cols, add) -> int:
        """Pages that appending `add` entries to each of `cols` of `slot` would take (worst case)."""
        cols = np.asarray(cols, np.int64)
        n = self.length[slot, cols]
        bs = self.block_size
        return int(((n + np.asarray(add) + bs - 1) // bs - (n + bs - 1) // bs).sum())

    def _grow(self, need: int) -> None:
        n = self.num_pages
        new = max(n + need, n + n // 2)
        if self.max_pages is not None:
            new = min(new, self.max_pages)
        if new - n < need:
            raise CacheFull(f"the KV cache needs {need} more pages; its budget holds "
                            f"{self.max_pages} pages of {self.page_bytes} bytes")
        k = self.k.new_zeros((new,) + tuple(self.k.shape[1:]))
        k[:n] = self.k
        v = self.v.new_zeros(k.shape)
        v[:n] = self.v
        self.k, self.v = k, v
        self._free.extend(range(new - 1, n - 1, -1))

    def _alloc(self, count: int) -> np.ndarray:
        if count > len(self._free):
            self._grow(count - len(self._free))
        out = np.array(self._free[-count:][::-1], np.int64) if count else np.zeros(0, np.int64)
        del self._free[len(self._free) - count:]
        self.pages_used += count
        self.peak_pages = max(self.peak_pages, self.pages_used)
        return out

    # ------------------------------------------------------------------ appends

    def append_one(self, slots: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """One new entry for each (slot, col) pair (pairs distinct). -> flat pool indices
        (page * block_size + offset) where each entry's K/V go."""
        bs = self.block_size
        n = self.length[slots, cols]
        off, page_i = n % bs, n // bs
        new = off == 0
        if new.any():
            self.table[slots[new], cols[new], page_i[new]] = self._alloc(int(new.sum()))
        self.length[slots, cols] = n + 1
        self._count(len(slots))
        return self.table[slots, cols, page_i] * bs + off

    def append(self, slot: int, col: int, count: int) -> np.ndarray:
        """`count` new entries for one (slot, col). -> their flat pool indices, in order."""
        bs = self.block_size
        n0 = int(self.length[slot, col])
        n1 = n0 + count
        have, want = -(-n0 // bs), -(-n1 // bs)
        if want > self.max_pages_per_list:
            raise CacheFull(f"a sequence needs {n1} cache entries, more than the context")
        if want > have:
            self.table[slot, col, have:want] = self._alloc(want - have)
        self.length[slot, col] = n1
        self._count(count)
        pos = np.arange(n0, n1)
        return self.table[slot, col, pos // bs] * bs + pos % bs

    def _count(self, entries: int) -> None:
        self.entries += entries
        self.appended += entries
        self.peak_entries = max(self.peak_entries, self.entries)

    def release(self, slot: int) -> None:
        """Return every page of a sequence slot to the free list."""
        bs = self.block_size
        lens = self.length[slot]
        for col in np.nonzero(lens)[0]:
            pages = self.table[slot, col, : -(-int(lens[col]) // bs)]
            self._free.extend(int(p) for p in pages[::-1])
            self.pages_used -= len(pages)
        self.entries -= int(lens.sum())
        self.length[slot] = 0
        self.table[slot] = 0

    # ------------------------------------------------------------------ reads

    def write(self, flat: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [n, kv_heads, head_dim] into the pool at flat indices [n]."""
        g, d = self.kv_heads, self.head_dim
        self.k.view(-1, g, d).index_copy_(0, flat, k)
        self.v.view(-1, g, d).index_copy_(0, flat, v)

    def gather(self, slots: np.ndarray, cols: np.ndarray):
        """K, V [n, kv_heads, L, head_dim] (L = the longest list, rounded up to whole pages) of
        the lists (slots[i], cols[i]), and their lengths [n] (numpy). The pages are copied into
        one transient tensor (torch has no paged attention kernel on CPU); padding entries point
        at the zero page and must be masked."""
        lens = self.length[slots, cols]
        bs = self.block_size
        pages = max(1, -(-int(lens.max()) // bs))
        idx = torch.from_numpy(np.ascontiguousarray(self.table[slots, cols, :pages]).reshape(-1))
        n, g, d = len(slots), self.kv_heads, self.head_dim
        k = self.k.index_select(0, idx).view(n, pages * bs, g, d).transpose(1, 2)
        v = self.v.index_select(0, idx).view(n, pages * bs, g, d).transpose(1, 2)
        return k, v, lens

    # ------------------------------------------------------------------ memory

    def stored_bytes(self) -> int:
        """Bytes of the K/V entries stored now."""
        return int(self.length.sum()) * self.entry_bytes

    def stats(self) -> dict:
        return {"page_bytes": self.page_bytes, "block_size": self.block_size,
                "peak_pages": self.peak_pages, "peak_page_bytes": self.peak_pages * self.page_bytes,
                "peak_entry_bytes": self.peak_entries * self.entry_bytes,
                "pool_bytes": self.num_pages * self.page_bytes}
