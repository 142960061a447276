"""tools/bench.py's figures for long unattended runs: what a checkpoint costs the training loop,
what a slow source costs with and without read-ahead, and how long a parquet source takes to resume.

    checkpoint (part of bench.py's section): the loop's blocked time per save, synchronous
                (checkpoint.background: false, the "before") and in the background (the "after",
                the median over the saves after the first, which allocates the snapshot's buffers);
                the background write's duration; steps trained while it runs; the snapshot's size and
                the peak extra resident memory; a mirror copy with its read-back verification
    prefetch    training tokens/s with a deliberately slow source (nemoe.data.DOCUMENT_DELAY_S per
                document: 5 ms, or half a step's time spread over its documents where steps are
                slow) against the same source without the delay, data.prefetch_batches 0 and 8
    parquet     a FineWeb-like parquet file of --parquet-mb MB (1,000-document row groups): time from
                a new TokenStream's load_state_dict to its first batch, at a position 90 % into the
                file, with row-group shards and with the old one-shard-per-file layout

This module trains: the checkpoint and prefetch figures come from nemoe's Trainer, built and
run through tools/harness.py (the checkpoint section's Trainer is the one tools/bench.py opens).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from nemoe import data as data_module
from nemoe.config import find_config, read_yaml
from nemoe.data import DataConfig, SourceConfig, TokenStream
from nemoe.mirror import Mirror
from nemoe.tokenizer import get_tokenizer
from tools.harness import close_trainer, open_trainer, timed

SLOW_SOURCE_DELAY_S = 0.005   # the example: 5 ms per document


# --------------------------------------------------------------------------- #
# Checkpoints
# --------------------------------------------------------------------------- #

def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Linux: reset VmHWM (the resident high-water mark) to the current resident size."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def tensor_bytes(state) -> int:
    """Bytes of the distinct tensor storages in a state (what snapshot() copies)."""
    seen = {}

    def walk(obj):
        if isinstance(obj, torch.Tensor):
            s = obj.untyped_storage()
            seen[(obj.device, s.data_ptr())] = s.nbytes()
        elif isinstance(obj, dict):
            for v in obj.values():
                walk(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v)
    walk(state)
    return sum(seen.values())


def measure_saves(trainer, device: torch.device, repeats: int, mirror_dir: Path) -> dict:
    """Save through the real Trainer and Checkpointer, synchronously and in the background."""
    saver = trainer.checkpointer
    saver.cfg.background = False   # before: the loop waits for torch.save, fsync and rename
    sync_s = [timed(trainer.save, device) for _ in range(repeats)]
    saver.cfg.background = True    # after: the loop waits for the snapshot only
    blocked, write_s, peak = [], [], []
    for _ in range(repeats + 1):   # the first allocates the snapshot's buffers, the others refill them
        rss = _status_kb("VmRSS") if _reset_peak_rss() else None
        blocked.append(timed(trainer.save, device))
        write = saver.pending
        saver.wait()
        write_s.append(write.seconds)
        if rss is not None:
            peak.append((_status_kb("VmHWM") - rss) * 1024)
    # Training while a write is in flight: step times with and without one.
    quiet = [timed(trainer.train_step, device) for _ in range(2)]
    trainer.save()
    during, write = [], saver.pending
    while write.thread.is_alive():
        during.append(timed(trainer.train_step, device))
    saver.wait()
    # A mirror on the same disk: copy, fsync, read back, compare, manifest.
    saver.mirror = Mirror(mirror_dir, trainer.paths, saver.cfg.keep_last)
    trainer.save()
    saver.wait()
    start = time.perf_counter()
    saver.mirror.close()
    mirror_s = time.perf_counter() - start
    saver.drain_mirror()
    saver.mirror = None
    return {"save_s": statistics.median(sync_s), "blocked_s": statistics.median(blocked[1:] or blocked),
            "blocked_s_first_save": blocked[0],
            "background_write_s": statistics.median(write_s), "snapshot_bytes": tensor_bytes(trainer.state_dict()),
            "peak_extra_rss_bytes": max(peak) if peak else None,
            "step_s_quiet": statistics.mean(quiet), "steps_during_write": len(during),
            "step_s_during_write": statistics.mean(during) if during else None,
            "mirror_copy_verify_s": mirror_s}


# --------------------------------------------------------------------------- #
# A slow source, with and without read-ahead
# --------------------------------------------------------------------------- #

class _CountingTokenizer:
    """The stream's tokenizer, counting documents (one encode() per document)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.documents = tokenizer, 0
        self.eot_id = tokenizer.eot_id

    def encode(self, text: str) -> list[int]:
        self.documents += 1
        return self.tokenizer.encode(text)


def bench_prefetch(ctx) -> dict:
    """Training tokens/s of the real Trainer (a narrow model, built-in corpus) with
    data.prefetch_batches 0 and 8, each with and without a per-document delay, interleaved over
    rounds. The delay is 5 ms, or more where the steps are slow: enough for the source alone
    to take half a step's time (so it shows without read-ahead, and a producer keeps up)."""
    raw = read_yaml(find_config("local.yaml"))
    # A narrow model on the t4 batch (16 x 64 tokens, a few documents per step): steps short
    # enough on a CPU that a slow source is a large share of them, as on a GPU.
    raw["model"] = {"d_model": 32, "n_layers": 2, "n_heads": 2, "seq_len": 64, "d_expert": 64}
    raw["train"].update(batch_size=16, device=str(ctx.device), precision="fp32")
    raw["plasticity"]["experts"]["enabled"] = False
    raw["log"] = {"every_steps": 10 ** 6, "sample_every_steps": 0, "console": "plain"}
    raw["eval"] = {"every_steps": 0, "batches": 1, "batch_size": 2}
    raw["checkpoint"] = {"every_steps": 0, "every_minutes": 0}
    trainer = open_trainer(raw, ctx.run_dir / "prefetch", "bench")
    counter = trainer.stream.reader.tokenizer = _CountingTokenizer(trainer.stream.reader.tokenizer)
    steps, rounds = (3, 1) if ctx.quick else (10, 3)
    try:
        trainer.cfg.data.prefetch_batches = 0
        trainer.stream.close()
        for _ in range(2):
            trainer.train_step()
        counter.documents, start = 0, time.perf_counter()
        for _ in range(steps):
            trainer.train_step()
        step_s, docs_per_step = (time.perf_counter() - start) / steps, max(counter.documents / steps, 1e-9)
        delay = max(SLOW_SOURCE_DELAY_S, 0.5 * step_s / docs_per_step)
        runs = {(d, depth): [] for d in (0.0, delay) for depth in (0, 8)}
        for _ in range(rounds):
            for d, depth in runs:
                trainer.cfg.data.prefetch_batches = depth
                trainer.stream.close()   # the next read starts the stream again with this setting
                data_module.DOCUMENT_DELAY_S = d
                for _ in range(2):
                    trainer.train_step()
                _wait_until_full(trainer.stream)
                runs[(d, depth)].append(sum(timed(trainer.train_step, ctx.device) for _ in range(steps)))
    finally:
        data_module.DOCUMENT_DELAY_S = 0.0
        close_trainer(trainer)
    tokens = steps * trainer.tokens_per_step
    tps = {f"prefetch_{depth}{'_slow' if d else ''}": tokens / statistics.median(t) for (d, depth), t in runs.items()}
    return {"delay_s": delay, "documents_per_step": docs_per_step, "step_s": step_s, "steps": steps,
            "rounds": rounds, "tokens_per_step": trainer.tokens_per_step, "tokens_per_s": tps,
            "slow_vs_fast_prefetch_0": tps["prefetch_0_slow"] / tps["prefetch_0"],
            "slow_vs_fast_prefetch_8": tps["prefetch_8_slow"] / tps["prefetch_8"]}


def _wait_until_full(stream, limit_s: float = 10.0) -> None:
    """Steady state: the producer has filled its queue (it keeps up), or no producer."""
    producer = stream._source.current
    deadline = time.monotonic() + limit_s
    while getattr(producer, "items", None) is not None and not producer.items.full() and time.monotonic() < deadline:
        time.sleep(0.02)


# --------------------------------------------------------------------------- #
# Parquet resume
# --------------------------------------------------------------------------- #

def write_fineweb_like(path: Path, target_mb: int, rows_per_group: int = 1000, seed: int = 0) -> dict:
    """A parquet file of about `target_mb` MB: FineWeb's columns, ~3 KB documents of Zipf-distributed
    words (they compress about as much as web text under snappy), `rows_per_group` rows per row group."""
    rng = np.random.default_rng(seed)
    vocab = np.array([f"w{i:x}" + "aeiou"[i % 5] * (1 + i % 4) for i in range(30_000)])
    start, rows = time.perf_counter(), 0
    with pq.ParquetWriter(path, pa.schema([("text", pa.string()), ("id", pa.string()), ("url", pa.string()),
                                           ("language", pa.string()), ("language_score", pa.float64()),
                                           ("token_count", pa.int64())])) as writer:
        while not path.exists() or path.stat().st_size < target_mb * 1e6:
            lengths = rng.integers(150, 900, rows_per_group)
            words = vocab[np.minimum(rng.zipf(1.2, int(lengths.sum())) - 1, len(vocab) - 1)]
            cuts = np.cumsum(lengths)[:-1]
            texts = [" ".join(w) for w in np.split(words, cuts)]
            ids = [f"<urn:uuid:{rows + i:012d}>" for i in range(rows_per_group)]
            writer.write_table(pa.table({"text": texts, "id": ids, "url": [f"https://example.org/{i}" for i in ids],
                                         "language": ["en"] * rows_per_group,
                                         "language_score": rng.random(rows_per_group),
                                         "token_count": lengths}), row_group_size=rows_per_group)
            rows += rows_per_group
    return {"rows": rows, "row_groups": pq.ParquetFile(path).metadata.num_row_groups,
            "bytes": path.stat().st_size, "write_s": time.perf_counter() - start}


def bench_parquet(ctx) -> dict:
    path = ctx.run_dir / "fineweb-like.parquet"
    written = write_fineweb_like(path, ctx.parquet_mb)
    cfg = DataConfig(sources=[SourceConfig(name="web", kind="files", path=str(path))], heldout_fraction=0.01,
                     seed=0, prefetch_batches=0)
    tokenizer, seq_len, batch = get_tokenizer("gpt2"), 64, 16
    position_rows = int(0.9 * written["rows"])
    out = {**written, "position_rows": position_rows}
    for layout in ("row_groups", "files"):
        stream = TokenStream(cfg, tokenizer, seq_len)
        if layout == "files":   # a state of the old layout (no "shards" entry) switches the stream to it
            stream.load_state_dict({k: v for k, v in stream.state_dict().items() if k != "shards"})
        start = time.perf_counter()
        for _ in range(position_rows):   # held-out documents (1 %) are skipped by the stream itself
            stream.next_document()
        out[f"read_to_position_s_{layout}"] = time.perf_counter() - start
        state = stream.state_dict()
        stream.close()
        start = time.perf_counter()
        resumed = TokenStream(cfg, tokenizer, seq_len)
        opened = time.perf_counter() - start
        resumed.load_state_dict(state)
        resumed.next_batch(batch)
        out[f"resume_s_{layout}"] = time.perf_counter() - start
        out[f"open_s_{layout}"] = opened
        resumed.close()
    path.unlink()
    return out
