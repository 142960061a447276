"""Each component says when its job is due (nemoe/schedule.py); the Trainer asks them in order."""

from types import SimpleNamespace

from nemoe.checkpoint import Checkpointer
from nemoe.distributed import DistInfo
from nemoe.evaluator import Evaluator
from nemoe.logs import NullLogger, RunLogger
from nemoe.schedule import every


def test_every_n_steps_and_zero_is_never():
    assert [s for s in range(13) if every(s, 4)] == [0, 4, 8, 12]
    assert not any(every(s, 0) for s in range(13))


def test_log_rows_are_due_on_every_rank_alike():
    # Rank 0's RunLogger and the other ranks' NullLogger close intervals at the same steps
    # (the rows' sums are collectives).
    main = SimpleNamespace(every_steps=5)
    assert [s for s in range(1, 12) if RunLogger.row_due(main, s)] == [5, 10]
    assert [s for s in range(1, 12) if NullLogger(5).row_due(s)] == [5, 10]
    assert not any(NullLogger().row_due(s) for s in range(1, 12))


def test_evaluation_samples_and_checkpoints_are_due_when_their_settings_say():
    cfg = SimpleNamespace(eval=SimpleNamespace(every_steps=4),
                          log=SimpleNamespace(sample_every_steps=3, sample_tokens=8))
    main = SimpleNamespace(cfg=cfg, runtime=SimpleNamespace(dist=DistInfo(rank=0, world_size=2)))
    other = SimpleNamespace(cfg=cfg, runtime=SimpleNamespace(dist=DistInfo(rank=1, world_size=2)))
    assert [s for s in range(1, 11) if Evaluator.due(main, s, target=10)] == [4, 8, 10]
    assert [s for s in range(1, 11) if Evaluator.sample_due(main, s)] == [3, 6, 9]
    assert not any(Evaluator.sample_due(other, s) for s in range(1, 11))   # a sample is a log line
    cfg.log.sample_tokens = 0
    assert not any(Evaluator.sample_due(main, s) for s in range(1, 11))
    saver = SimpleNamespace(cfg=SimpleNamespace(every_steps=4))
    assert [s for s in range(1, 11) if Checkpointer.due(saver, s, target=10, timed=s == 7)] == [4, 7, 8, 10]
