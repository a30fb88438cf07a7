"""Paged KV cache: one pool of fixed-size blocks shared by all layers, plus the block manager.

Memory layout: ``kv`` is one tensor (2, L, num_blocks, block_size, H_kv, head_dim) — K and V of every
layer for a block live at the same block index, so a sequence needs one block table for all layers
and a token's slot (block * block_size + offset) addresses it in every layer. Viewed flat as
(2, L, num_blocks * block_size, H_kv, head_dim), a batch of tokens is written with one indexed store
per layer, and the KV fill of skipped layers writes a contiguous range of layers in one store.

Prefix caching: every *full* prompt block gets a chained hash (hash of the previous block's hash and
its token ids). A new sequence whose leading full blocks hash (and compare) equal reuses those blocks
with a reference count instead of recomputing them. Freed blocks keep their hash until the block is
handed out again, so a recently finished prompt can still be hit. Only blocks computed by prefill at
full depth are registered: decode blocks may hold propagated (approximate) K/V from early exits.

Sliding windows: when every layer of the model attends to its last ``window`` positions only, a block
whose positions all lie before the window of a sequence's next query is never read again; :meth:`trim`
returns it to the pool and leaves :data:`NULL_BLOCK` in its table entry, so positions still map to
entries by index. (With one global layer, as in Gemma 3, every block stays: that layer reads them all.)
"""

from __future__ import annotations

import math
import mmap
from collections import deque

import torch

from exitwise.engine.sequence import Sequence

# A block-table entry whose block was freed because no layer's window reaches it any more.
NULL_BLOCK = -1


def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                    dtype: torch.dtype) -> int:
    """K and V of all layers for one block."""
    return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def zeros_on_use(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A zero tensor. On the CPU its memory is an anonymous mapping, which reads as zeros and becomes
    resident page by page as it is written: the pool costs the blocks sequences have used, not its
    budget (torch.zeros writes every page: 256 MB of resident memory for a default pool that a short
    request uses a few pages of)."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    count = math.prod(shape)
    buf = mmap.mmap(-1, max(1, count * torch.empty((), dtype=dtype).element_size()))
    return torch.frombuffer(buf, dtype=dtype, count=count).view(shape)  # the tensor keeps buf alive


class KVCache:
    """The tensor pool. ``num_blocks`` is derived from a byte budget (see :func:`bytes_per_block`)."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, *, block_size: int = 16,
                 memory_bytes: int | None = None, num_blocks: int | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        per_block = bytes_per_block(num_layers, block_size, num_kv_heads, head_dim, dtype)
        if num_blocks is None:
            if memory_bytes is None:
                raise ValueError("give kv_cache_bytes (memory budget) or num_blocks")
            num_blocks = int(memory_bytes // per_block)
        if num_blocks < 1:
            raise ValueError(f"kv_cache_bytes={memory_bytes} holds no block of {per_block} bytes "
                             f"(block_size={block_size}, layers={num_layers})")
        self.num_layers, self.block_size, self.num_blocks = num_layers, block_size, num_blocks
        self.kv = zeros_on_use((2, num_layers, num_blocks, block_size, num_kv_heads, head_dim), dtype, device)
        # (2, L, S, H_kv, hd) with S = num_blocks * block_size: slot-addressed view of the same memory.
        self.flat = self.kv.view(2, num_layers, num_blocks * block_size, num_kv_heads, head_dim)

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


class BlockManager:
    """Free list, reference counts and prefix-cache hashes for the blocks of a :class:`KVCache`."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 window: int | None = None):
        self.block_size = block_size
        # the widest layer's window when every layer slides (None: some layer reads the whole context)
        self.window = window
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self.hash_to_block: dict[int, int] = {}
        self.free: deque[int] = deque(range(num_blocks))
        self.prefix_hits = 0  # blocks reused (for metrics)
        self.window_freed = 0  # blocks freed by trim (outside every window; for metrics)

    # ------------------------------------------------------------------------------------- queries
    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, seq: Sequence) -> bool:
        # Conservative: ignores possible prefix hits, so admission never over-commits.
        return self.blocks_needed(len(seq)) <= self.num_free

    def can_append(self, seq: Sequence) -> bool:
        """Room for the K/V of the token the next decode step feeds (position len(seq) - 1)."""
        return len(seq) <= len(seq.block_table) * self.block_size or self.num_free >= 1

    # ----------------------------------------------------------------------------------- mutations
    def _take_free(self) -> int:
        block = self.free.popleft()
        old = self.block_hash[block]
        if old is not None and self.hash_to_block.get(old) == block:
            del self.hash_to_block[old]  # its old contents are about to be overwritten
        self.block_hash[block] = None
        self.block_tokens[block] = None
        self.ref_count[block] = 1
        return block

    def allocate(self, seq: Sequence) -> None:
        """Give ``seq`` blocks for all its tokens, reusing cached full prefix blocks where possible."""
        assert not seq.block_table, f"{seq.request_id} already has blocks"
        bs = self.block_size
        prev_hash = -1
        cached_blocks = 0
        hashing = self.enable_prefix_caching
        # Never serve the *whole* sequence from cache: prefill must compute at least the last token
        # to produce logits, so at most (len - 1) // bs leading blocks can be hits.
        max_hits = (len(seq) - 1) // bs
        for i in range(self.blocks_needed(len(seq))):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            full = len(tokens) == bs
            h = hash((prev_hash, tokens)) if hashing and full else None
            block = self.hash_to_block.get(h) if h is not None and i < max_hits else None
            if block is not None and self.block_tokens[block] == tokens and cached_blocks == i:
                if self.ref_count[block] == 0:
                    self.free.remove(block)  # O(n) but rare and n is small
                self.ref_count[block] += 1
                cached_blocks += 1
                self.prefix_hits += 1
            else:
                block = self._take_free()
                if h is not None:
                    # Registered now, filled by this prefill before any other sequence can read it.
                    self.block_hash[block] = h
                    self.block_tokens[block] = tokens
                    self.hash_to_block[h] = block
            seq.block_table.append(block)
            prev_hash = h if h is not None else -1
            if h is None:
                hashing = False  # a partial block ends the hash chain
        seq.num_cached_tokens = cached_blocks * bs

    def append_slot(self, seq: Sequence) -> None:
        """Make sure the token at position len(seq) - 1 has a slot (allocates a block at boundaries)."""
        if len(seq) > len(seq.block_table) * self.block_size:
            seq.block_table.append(self._take_free())

    def grow_to(self, seq: Sequence, num_tokens: int) -> bool:
        """Blocks for positions < ``num_tokens`` of ``seq``, all or none (False: not enough free)."""
        need = self.blocks_needed(num_tokens) - len(seq.block_table)
        if need > self.num_free:
            return False
        for _ in range(need):
            seq.block_table.append(self._take_free())
        return True

    def trim(self, seq: Sequence) -> int:
        """Free ``seq``'s leading blocks that no layer reads again (all-sliding models only); returns
        how many. Call with ``len(seq)`` the committed length whose last token the next step feeds: its
        query at position len - 1 reads keys from len - window on, and later queries read less far back.
        (Not while drafting: a rollback would need the drafts' window back.)"""
        if self.window is None:
            return 0
        dead = min(max(len(seq) - self.window, 0) // self.block_size, len(seq.block_table))
        freed = 0
        for i in range(dead - 1, -1, -1):  # newest first: trimmed on earlier steps below them
            block = seq.block_table[i]
            if block == NULL_BLOCK:
                break
            seq.block_table[i] = NULL_BLOCK
            self._unref(block)
            freed += 1
        self.window_freed += freed
        return freed

    def truncate(self, seq: Sequence, num_tokens: int) -> None:
        """Keep only the blocks holding positions < ``num_tokens`` (speculative rollback)."""
        keep = self.blocks_needed(num_tokens)
        while len(seq.block_table) > keep:
            self._unref(seq.block_table.pop())

    def uncache(self, seq: Sequence, first: int = 0) -> None:
        """Forget the prefix-cache entries of the blocks only ``seq`` holds, from its ``first``-th block
        on: a step that failed, or a prefill that was not run, left them unfilled, and no later request
        may read them as a cached prefix."""
        for block in seq.block_table[first:]:
            h = None if block == NULL_BLOCK else self.block_hash[block]
            if h is None or self.ref_count[block] != 1:
                continue
            if self.hash_to_block.get(h) == block:
                del self.hash_to_block[h]
            self.block_hash[block] = None
            self.block_tokens[block] = None

    def _unref(self, block: int) -> None:
        self.ref_count[block] -= 1
        if self.ref_count[block] == 0:
            # Blocks with a hash go to the back so cached prefixes survive longest.
            if self.block_hash[block] is not None:
                self.free.append(block)
            else:
                self.free.appendleft(block)

    def release(self, seq: Sequence) -> None:
        """Drop ``seq``'s references; blocks reaching zero go back to the free list at once."""
        for block in reversed(seq.block_table):
            if block != NULL_BLOCK:
                self._unref(block)
        seq.block_table = []
        seq.num_cached_tokens = 0
        seq.num_computed_tokens = 0
