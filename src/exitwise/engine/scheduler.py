"""Iteration-level scheduler: which sequences run in the next step, prefill or decode.

Each call to :meth:`Scheduler.schedule` plans exactly one model step:

* **Prefill first.** If requests are waiting and their blocks fit, admit them FCFS while the step stays
  within ``max_num_batched_tokens`` (prompt tokens not served from the prefix cache) and
  ``max_num_seqs`` running sequences. New requests therefore join between decode steps
  (continuous batching); the next decode step simply includes them.
* **Otherwise decode** every running sequence by one token. A sequence crossing a block boundary
  needs a fresh block; when none is free the scheduler **pre-empts by recompute**: the most recently
  admitted running sequence gives back all its blocks and returns to the *front* of the waiting queue
  with its prompt *and* generated tokens. When re-admitted it is prefilled again over all of them (at
  full depth), which rebuilds its cache exactly; its sampling state and outputs are kept, so the
  client sees no difference except latency. Recompute was chosen over swapping because on CPU the
  "swap space" would be the same RAM, and re-prefilling a few hundred tokens is cheap compared with a
  decode step per token.

Finished or aborted sequences release their blocks immediately (:meth:`finish`). On a model whose
layers all slide, a decode step first frees the blocks that fell out of every window
(:meth:`BlockManager.trim`).
"""

from __future__ import annotations

from collections import deque

from exitwise.engine.kv_cache import BlockManager
from exitwise.engine.sequence import Sequence, SequenceStatus


class Scheduler:
    def __init__(self, block_manager: BlockManager, *, max_num_seqs: int = 16, max_num_batched_tokens: int = 2048,
                 max_model_len: int = 2048):
        # the limits are checked where they are configured (EngineConfig)
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        # A sequence that could never fit would wait forever; reject it up front.
        need = self.blocks.blocks_needed(len(seq) + seq.params.max_tokens)
        if need > self.blocks.num_blocks:
            raise ValueError(f"prompt ({len(seq)} tokens) + max_tokens ({seq.params.max_tokens}) needs {need} KV "
                             f"blocks but the cache has {self.blocks.num_blocks}; raise kv_cache_bytes")
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[list[Sequence], bool]:
        """The sequences of the next step and whether it is a prefill step ([] if nothing to do)."""
        batch: list[Sequence] = []
        budget = self.max_num_batched_tokens
        while self.waiting and len(self.running) + len(batch) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.blocks.can_allocate(seq):
                break
            self.blocks.allocate(seq)
            new_tokens = len(seq) - seq.num_cached_tokens
            # Always admit one sequence even if alone it exceeds the budget (otherwise it would starve).
            if batch and new_tokens > budget:
                # its new blocks were registered as cached prefix blocks, to be filled by a prefill
                # that now does not run: forget them, or a later request (this one, re-admitted, or one
                # with the same prompt) would read their stale K/V as its prefix
                self.blocks.uncache(seq, first=seq.num_cached_tokens // self.blocks.block_size)
                self.blocks.release(seq)
                break
            budget -= new_tokens
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            batch.append(seq)
        if batch:
            self.running.extend(batch)
            return batch, True

        # Decode: every running sequence, pre-empting from the back when blocks run out.
        scheduled: list[Sequence] = []
        while self.running:
            seq = self.running.popleft()
            self.blocks.trim(seq)  # first: what it frees may spare a pre-emption
            while not self.blocks.can_append(seq):
                if self.running:
                    self._preempt(self.running.pop())
                else:
                    self._preempt(seq)
                    break
            else:
                self.blocks.append_slot(seq)
                scheduled.append(seq)
        self.running.extend(scheduled)
        return scheduled, False

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.release(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Stop ``seq`` (length / stop / abort) and free its blocks now."""
        if seq.status is SequenceStatus.FINISHED:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        if seq.block_table:
            self.blocks.release(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
