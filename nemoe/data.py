"""Training batches: the source mixture (nemoe/sources.py) -> tokens -> packed blocks, read
ahead of the GPU, at an exact position that survives read faults.

`TokenStream` tokenizes documents (GPT-2 BPE or UTF-8 bytes, data.tokenizer), ends each
with end-of-text and cuts the concatenation into blocks of seq_len + 1 tokens; what is left
of a document carries into the next block (no truncation). There is no shuffle buffer: its
content would not be in `state_dict()`; data.shuffle reads sources that can be indexed
(built-in, local files) as a seeded permutation instead, which a position points into.

Position. After every batch the stream records a `Position`: the `datasets` state
(which example of which shard each source reached, the interleave's RNG) and the tokens
read but not yet emitted. A new stream that loads it yields the same next batches, bit
for bit. That one mechanism serves three purposes:

- checkpoints: `state_dict()` is the position after the last batch *training took*;
- read-ahead: a bounded background thread (`data.prefetch_batches`) reads, formats,
  tokenizes and packs the next batches while the model trains; each batch travels with
  the position after it, so batches read ahead but not yet taken are not in a checkpoint;
- faults: when a read fails (a dropped connection, HTTP 5xx / 429 once `datasets`' own
  retries are spent, a storage mount gone), the producer rebuilds the mixture, reopens it
  at the position after the last whole batch and reads that batch again, with back-off,
  one log line per attempt, for up to `data.retry_minutes`. A recovered fault therefore
  changes nothing in training. Past the limit the stream raises `DataUnavailable` and the
  trainer saves a checkpoint, then exits 2.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
import weakref
from dataclasses import dataclass, replace
from typing import Callable, Iterator

import torch

from nemoe import distributed, faults
from nemoe.config import lib as configlib
from nemoe.errors import UserError
from nemoe.faults import brief as _brief, duration as _duration
from nemoe.documents import alpaca_document, is_heldout, wikitext_articles
from nemoe.heldout import heldout_batches
from nemoe.sources import (DataConfig, SourceConfig, builtin_corpus, source_documents, source_of_error,
                           training_mixture)

__all__ = ["DataConfig", "DataExhausted", "DataInterrupted", "DataStopped", "DataUnavailable", "Position",
           "SourceConfig", "TokenStream", "alpaca_document", "builtin_corpus", "heldout_batches", "is_heldout",
           "source_documents", "wikitext_articles"]   # the sources' names too: nemoe.data was their home

# Back-off between attempts to reopen a failed stream: doubling from the first delay up to the cap.
RETRY_FIRST_DELAY_S = 2.0
RETRY_MAX_DELAY_S = 120.0
# A deliberately slow source for tests and tools/bench.py: seconds slept per document read. 0 in runs.
DOCUMENT_DELAY_S = 0.0
# How long a stop waits for the producer thread to finish its current read before abandoning it.
STOP_TIMEOUT_S = 10.0
# The "shards" entry of a state: parquet sources read as one shard per row group (sources.py).
# States without it were written when a shard was a whole file; they load into that layout.
ROW_GROUP_SHARDS = "row_groups"


class DataStopped(UserError):
    """The training data stopped. The trainer saves a checkpoint at the last whole step, then
    ends the run: with exit code 2 when `fatal`, normally otherwise."""

    fatal = True


class DataExhausted(DataStopped):
    """The training mixture ran out (data.on_exhausted: stop)."""

    fatal = False


class DataUnavailable(DataStopped):
    """Reading failed for longer than data.retry_minutes, or the data cannot be parsed."""


class DataInterrupted(DataStopped):
    """A stop signal (Ctrl-C, SIGTERM) arrived while the stream was waiting for data."""

    fatal = False


@dataclass(frozen=True)
class Position:
    """Where the stream stands between two batches (both parts are never mutated once made)."""

    dataset: dict          # the `datasets` mixture state
    pending: list[int]     # tokens read but not yet emitted: the packer's leftovers
    window: int = 0        # data.mix_blocks: the index of the window `dataset`/`pending` start,
    served: int = 0        # and how many of its blocks were emitted (0, 0 without mixing)


def is_read_fault(err: BaseException) -> bool:
    """A failed read that may succeed later (nemoe/faults.py): a transport failure, or a file or
    dataset not found mid-run (a storage mount gone, the Hub answering 404 for a moment)."""
    return faults.classify(err) in ("retry", "not_found")


class _Backoff:
    """One outage's retries: a doubling delay, the deadline, one note per attempt."""

    def __init__(self, minutes: float, sources: list[SourceConfig], note: Callable[[str], None],
                 stopped: Callable[[], bool]):
        self.minutes, self.sources, self.note, self.stopped = minutes, sources, note, stopped
        self.reset()

    def reset(self) -> None:
        self.since, self.attempt = None, 0

    def wait(self, err: BaseException) -> None:
        """Sleep before the next attempt, or raise DataUnavailable once past the deadline."""
        now = time.monotonic()
        self.since = now if self.since is None else self.since
        self.attempt += 1
        where, left = source_of_error(err, self.sources), self.minutes * 60 - (now - self.since)
        if left <= 0:
            raise DataUnavailable(
                f"reading the training data failed for {_duration(now - self.since)}, longer than "
                f"data.retry_minutes ({self.minutes:g}); last error from {where}: {_brief(err)}. The run "
                "saves a checkpoint and stops: run the same command with --resume once the data is "
                "reachable") from None
        delay = min(RETRY_FIRST_DELAY_S * 2 ** (self.attempt - 1), RETRY_MAX_DELAY_S, left)
        self.note(f"data: {where}: {_brief(err)}; reopening the stream at its position in {delay:.1f} s "
                  f"(attempt {self.attempt}; gives up in {_duration(left)}, data.retry_minutes {self.minutes:g})")
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline:
            if self.stopped():
                raise DataInterrupted("stopped while waiting for the training data to come back")
            time.sleep(min(0.2, max(deadline - time.monotonic(), 0)))


class _Inline:
    """Batches made on the calling (training) thread: data.prefetch_batches = 0."""

    def __init__(self, generate):
        self.batches = generate()

    def get(self, on_wait) -> tuple[torch.Tensor, Position]:
        return next(self.batches)

    def stop(self) -> bool:
        self.batches.close()
        return True


class _Prefetcher:
    """A bounded producer: `generate(note, stopped)` runs on its own thread, `depth` batches ahead.
    Its notes and its error (raised on the consumer's thread) arrive in order with the batches."""

    def __init__(self, generate, depth: int):
        self.items: queue.Queue = queue.Queue(maxsize=depth)
        self.notes: queue.SimpleQueue = queue.SimpleQueue()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(generate,), name="nemoe-data", daemon=True)
        self.thread.start()

    def _run(self, generate) -> None:
        batches = generate(self.notes.put, self.stopping.is_set)
        try:
            for item in batches:
                if not self._put(("batch", item)):
                    return
        except BaseException as err:  # noqa: BLE001 -- handed to the consumer, raised there
            self._put(("error", err))
        finally:
            batches.close()  # on this thread: the generator (and `datasets`' readers) end here

    def _put(self, entry) -> bool:
        while not self.stopping.is_set():
            try:
                self.items.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def get(self, on_wait) -> tuple[torch.Tensor, Position]:
        while True:
            try:
                kind, value = self.items.get(timeout=0.1)
            except queue.Empty:
                if not self.thread.is_alive() and self.items.empty():
                    raise RuntimeError("the data thread ended without a batch or an error") from None
                on_wait(self.notes, True)
                continue
            on_wait(self.notes, False)
            if kind == "error":
                raise value
            return value

    def stop(self) -> bool:
        """Stop the producer; True when its thread ended (it finishes the read it is in)."""
        self.stopping.set()
        self.thread.join(STOP_TIMEOUT_S)
        return not self.thread.is_alive()


class _Reader:
    """The reading side: the mixture, documents -> tokens -> blocks, and the fault-tolerant batch
    generator. It runs on the producer's thread and holds no reference to its TokenStream, so an
    abandoned stream is collected (its finalizer then stops the producer)."""

    def __init__(self, cfg: DataConfig, tokenizer, block_len: int, rank: int, world_size: int):
        self.cfg, self.tokenizer, self.block_len = cfg, tokenizer, block_len
        self.rank, self.world_size = rank, world_size
        self.row_groups = True
        self.mixture = training_mixture(cfg)  # opened and checked now: errors a user can fix come first
        self.stale = False  # True: rebuild the mixture before reading (after a fault, or an abandoned reader)
        self.opened_at: dict | None = None  # the state the open iterator started from, until it reads

    def open(self, dataset_state: dict):
        """An iterator over the mixture's documents from `dataset_state`."""
        if self.stale:
            # A fresh mixture: the failed reader's threads may still be busy with the old one.
            self.mixture = training_mixture(self.cfg, self.row_groups, strict=False)
            self.stale = False
        self.mixture.load_state_dict(dataset_state)
        self.opened_at = dataset_state
        return iter(self.mixture)

    def dataset_state(self) -> dict:
        """The mixture's position. Until the open iterator has read a document, `datasets` still
        reports the state from before load_state_dict, so the state it was opened at is the answer."""
        return self.opened_at if self.opened_at is not None else self.mixture.state_dict()

    def read_document(self, documents) -> dict:
        self.opened_at = None  # from here on the mixture's own state is the position
        group = []
        for _ in range(self.world_size):  # one document per rank
            doc = next(documents, None)
            if doc is None:
                raise DataExhausted("the training data ran out: a source was exhausted and data.on_exhausted "
                                    "is 'stop'; set data.on_exhausted: cycle or lower train.total_tokens")
            group.append(doc)
        if DOCUMENT_DELAY_S:
            time.sleep(DOCUMENT_DELAY_S)
        return group[self.rank]

    def pack(self, documents, pending: list[int], batch_size: int) -> tuple[torch.Tensor, list[int]]:
        need = batch_size * self.block_len
        tokens = list(pending)
        while len(tokens) < need:
            tokens.extend(self.tokenizer.encode(self.read_document(documents)["text"]))
            tokens.append(self.tokenizer.eot_id)
        return torch.tensor(tokens[:need], dtype=torch.int64).view(batch_size, self.block_len), tokens[need:]

    def window(self, documents, start: Position) -> tuple[torch.Tensor, Position]:
        """(the data.mix_blocks blocks of the window that starts at `start`, in their seeded order;
        the position where the next window starts)."""
        blocks, pending = self.pack(documents, start.pending, self.cfg.mix_blocks)
        seed = configlib.derive_seed(self.cfg.seed or 0, f"data/mix/{self.rank}/{start.window}")
        order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))
        return blocks[order], Position(self.dataset_state(), pending, start.window + 1, 0)

    def batches(self, documents, batch_size: int, position: Position) -> Iterator[tuple[torch.Tensor, Position]]:
        """(batch, position after it) from the open `documents`, which start where `position` says."""
        if not self.cfg.mix_blocks:
            while True:
                batch, pending = self.pack(documents, position.pending, batch_size)
                position = Position(self.dataset_state(), pending)
                yield batch, position
        start = replace(position, served=0)  # the window being served
        blocks, after = self.window(documents, start)
        served = position.served
        while True:
            rows, need = [], batch_size
            while need:
                take = min(need, len(blocks) - served)
                rows.append(blocks[served:served + take])
                served, need = served + take, need - take
                if served == len(blocks):
                    start, served = after, 0
                    blocks, after = self.window(documents, start)
            yield torch.cat(rows), replace(start, served=served)

    def generate(self, batch_size: int, start: Position, note, stopped) -> Iterator[tuple[torch.Tensor, Position]]:
        """(batch, position after it), forever from `start`; a failed read reopens at the last whole batch."""
        backoff, position = _Backoff(self.cfg.retry_minutes, self.cfg.sources, note, stopped), start
        while True:
            documents = None
            try:
                documents = self.open(position.dataset)
                for batch, position in self.batches(documents, batch_size, position):
                    backoff.reset()
                    yield batch, position
            except Exception as err:  # noqa: BLE001 -- sorted below
                if not is_read_fault(err):
                    if faults.classify(err) == "data":  # unparseable data: retrying cannot help
                        raise DataUnavailable(f"the training data cannot be parsed ({source_of_error(err, self.cfg.sources)}: "
                                              f"{_brief(err)}); fix the file, then --resume") from None
                    raise
                self.stale = True
                backoff.wait(err)
            finally:
                if documents is not None:
                    documents.close()


class TokenStream:
    """Infinite stream of packed (B, seq_len+1) int64 blocks from the training mixture."""

    def __init__(self, cfg: DataConfig, tokenizer, seq_len: int, rank: int = 0, world_size: int = 1,
                 notify: Callable[[str], None] | None = None, should_stop: Callable[[], bool] | None = None):
        """rank / world_size: under data parallelism, rank r of W keeps documents r, r+W, r+2W, ...
        of the one mixture stream (the rule `datasets.distributed.split_dataset_by_node` applies
        when shards do not divide evenly, here always), so ranks train on disjoint documents and
        every rank sees the configured mixture. Each rank still reads (not tokenizes) every row.
        notify(text): a line for the run's log (retries), called on the caller's thread.
        should_stop(): True once a stop signal arrived; a wait for data then ends (one process only).
        `cfg` is taken as valid: a Config's data section is validated when it is built (a
        DataConfig made in code: see DataConfig.validate)."""
        self.cfg, self.tokenizer = cfg, tokenizer
        self.rank, self.world_size = rank, world_size
        self.block_len = seq_len + 1
        self.notify = notify or (lambda text: print(f"warning: {text}", file=sys.stderr, flush=True))
        self.should_stop = should_stop if world_size == 1 else None  # ranks must stop together
        self.reader = _Reader(cfg, tokenizer, self.block_len, rank, world_size)
        self._position = Position(self.reader.mixture.state_dict(), [])
        self._batch_size: int | None = None
        self._source = _Holder()  # the producer (or inline generator) of batches from self._position
        self._documents = None    # next_document()'s own reader
        weakref.finalize(self, self._source.stop)  # end the reader before interpreter shutdown

    @property
    def source_names(self) -> list[str]:
        return [s.name for s in self.cfg.sources]

    # -- taking batches (the consumer: the training thread) ------------------------------- #
    def next_batch(self, batch_size: int) -> torch.Tensor:
        """The next `batch_size` blocks, (B, seq_len+1) int64 on the CPU; inputs/targets are the trainer's shift."""
        if self._source.current is None or batch_size != self._batch_size:
            self._start(batch_size)
        try:
            batch, self._position = self._source.current.get(self._on_wait)
        except BaseException:
            self._stop()  # the producer has ended; the next read starts one from self._position
            raise
        return batch

    def next_batches(self, count: int, batch_size: int) -> list[torch.Tensor]:
        """One optimizer step's `count` micro-batches. When the data stops, the stream goes back to
        the step's start (the checkpoint the trainer then saves holds no half step). Under data
        parallelism the ranks agree first, so no rank is left waiting in backward."""
        self._settle()
        start, batches, stopped = self._position, [], None
        try:
            for _ in range(count):
                batches.append(self.next_batch(batch_size))
        except DataStopped as err:
            stopped = err
        if self.world_size > 1 and distributed.any_rank([stopped is not None])[0] and stopped is None:
            stopped = DataUnavailable("another rank's training data stopped; see its messages")
        if stopped is not None:
            self._stop()
            self._position = start
            raise stopped
        return batches

    def next_document(self) -> dict:
        """This rank's next training document, {"text", "source"}, read on the calling thread
        (inspection, tests, tools; it moves the dataset position, not the pending tokens)."""
        if self._documents is None:
            self._stop()
            self._documents = self.reader.open(self._position.dataset)
        return self.reader.read_document(self._documents)

    def _settle(self) -> None:
        """After next_document(): the position is the mixture's (taken only when it is needed)."""
        if self._documents is not None:
            self._position = Position(self.reader.dataset_state(), self._position.pending)

    def _on_wait(self, notes: queue.SimpleQueue, waiting: bool) -> None:
        """The producer's notes go to the log; a stop signal ends a wait for data."""
        while True:
            try:
                self.notify(notes.get_nowait())
            except queue.Empty:
                break
        if waiting and self.should_stop is not None and self.should_stop():
            raise DataInterrupted("stopped while waiting for training data")

    def _start(self, batch_size: int) -> None:
        self._stop()
        self._batch_size, start, reader = batch_size, self._position, self.reader
        if self.cfg.prefetch_batches > 0:  # the producer's thread must not hold the stream itself
            self._source.current = _Prefetcher(lambda note, stopped: reader.generate(batch_size, start, note, stopped),
                                               self.cfg.prefetch_batches)
        else:
            notify, should_stop = self.notify, self.should_stop or (lambda: False)
            self._source.current = _Inline(lambda: reader.generate(batch_size, start, notify, should_stop))

    def _stop(self) -> None:
        if self._documents is not None:
            self._settle()
            self._documents.close()
            self._documents = None
        if not self._source.stop():
            self.reader.stale = True  # a producer still busy with the old mixture: never share it

    # -- state ------------------------------------------------------------------------------ #
    def close(self) -> None:
        """Stop reading (the producer thread ends; with parquet sources that takes ~5 s: `datasets`
        sleeps on closing to let arrow's threads finish). Reading again continues from here."""
        self._stop()

    def state_dict(self) -> dict:
        """Plain python: the `datasets` mixture state, the pending tokens, the shard layout."""
        self._settle()
        state = {"sources": self.source_names, "dataset": self._position.dataset,
                 "pending_tokens": list(self._position.pending),
                 "shards": ROW_GROUP_SHARDS if self.reader.row_groups else "files"}
        if self.cfg.mix_blocks:
            state["mix"] = {"blocks": self.cfg.mix_blocks, "window": self._position.window,
                            "served": self._position.served}
        return state

    def load_state_dict(self, state: dict) -> None:
        if state.get("sources") != self.source_names:
            raise UserError(f"the data state is for sources {state.get('sources')}, "
                            f"but data.sources are {self.source_names}")
        self._stop()
        row_groups = state.get("shards") == ROW_GROUP_SHARDS
        if row_groups != self.reader.row_groups:  # a state written before row-group shards: the old layout
            self.reader.row_groups, self.reader.stale = row_groups, True
        mix = state.get("mix") or {}
        if mix and mix.get("blocks") != self.cfg.mix_blocks:
            raise UserError(f"the data state was saved with data.mix_blocks {mix.get('blocks')}, this run has "
                            f"{self.cfg.mix_blocks}: resume with the value it was saved with")
        self._position = Position(state["dataset"], [int(t) for t in state["pending_tokens"]],
                                  int(mix.get("window", 0)), int(mix.get("served", 0)))


class _Holder:
    """The stream's current producer, in an object of its own so a finalizer can stop it
    without keeping the stream alive."""

    def __init__(self):
        self.current = None

    def stop(self) -> bool:
        current, self.current = self.current, None
        return current.stop() if current is not None else True
