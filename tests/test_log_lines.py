"""The human-readable lines of training_log.txt and the console say what they mean.

Each test pins one wording a newcomer misread: which loss a line shows, what an
expert event's threshold is, which step a checkpoint line saved, the experts per
layer, the --max-steps cap, and --resume with a name that matches no run. The CSV
logs are not touched by any of this (tests/test_tensorboard.py, tests/test_trainer.py).
"""

from __future__ import annotations

import dataclasses
import math
import types

import pytest
import torch

from nemoe import rundir
from nemoe.config import load_config
from nemoe.logs import RunLogger, start_line
from nemoe.metrics import MetricsWindow
from nemoe.model import NemoeLM
from nemoe.plasticity import Plasticity
from nemoe.plasticity.base import Event
from nemoe.plasticity.experts import Action, ExpertMorphogenesis, reading
from nemoe.plasticity.growth import Growth
from nemoe.schema import RunPaths, train_columns
from nemoe.train_module import MicroBatchStats, StepResult
from tests.conftest import tiny_config
from tests.test_tensorboard import row_at


def runtime():
    return types.SimpleNamespace(device="cpu", precision="fp32", precision_reason="CPU",
                                 dist=types.SimpleNamespace(enabled=False))


PARAMS = {"total": 1000, "active_per_token": 600}


def test_the_start_line_names_the_max_steps_cap_before_the_target():
    cfg = load_config("local.yaml")
    total = cfg.total_steps()
    capped = start_line(runtime(), PARAMS, cfg, 1, stop_step=60)
    assert f"({total:,} steps) | stops at step 60 ({60 * cfg.tokens_per_step():,} tokens, --max-steps)" in capped
    for uncapped in (start_line(runtime(), PARAMS, cfg, 1), start_line(runtime(), PARAMS, cfg, 1, stop_step=total)):
        assert "stops at" not in uncapped and uncapped.endswith(f"({total:,} steps)")


def logged(tmp_path, write) -> list[str]:
    """The text log's lines (after the stamp and step) of what `write(logger)` logs."""
    logger = RunLogger(tmp_path, tiny_config(log={"console": "plain", "tensorboard": False}), 0, 64 * 20)
    write(logger)
    logger.close()
    return [line.split("| ", 1)[1] for line in (tmp_path / "training_log.txt").read_text().splitlines()]


def test_interval_rows_and_event_lines_say_which_loss_they_show(tmp_path, capsys):
    event = Event(step=10, tokens=640, granularity="expert", event="split", layer=1, unit="e5", expert=5,
                  parents="3", value=0.6123, threshold=0.35, n_before=2, n_after=3, probe_loss_before=5.2,
                  probe_loss_after=5.2, reading=reading(Action("split", 2, (0,), 0.6123, 0.35)))

    experts = ExpertMorphogenesis(tiny_config(), NemoeLM(tiny_config()))
    experts.records[1][2] = experts._new_record(birth_step=10, origin="split")   # the split's child: [2, 3]

    def write(logger):
        # the logger writes what the mechanisms say (Plasticity.event_notes, .structure), naming none
        logger.events(10, 640, 5.5823, 1e-3, [event], experts.event_notes([event]))
        logger.train_row(row_at(10) | {"window_steps": 10}, experts.structure())
        logger.train_row(row_at(11) | {"window_steps": 1}, experts.structure())

    event_line, counts, row, single = logged(tmp_path, write)
    assert event_line.startswith("Tokens 640 | LossCE (this step) 5.5823 | LR 1.00e-03 | Event expert_split")
    assert "| Usage 0.6123 > split_usage 0.35 | Experts 2→3 |" in event_line and "Thresh" not in event_line
    assert counts == "Experts per layer | [2, 3]"
    assert row.startswith("Tokens 640 | LossCE (mean of 10 steps) 7.9000 | LossLB (mean) 1.0100 | LR")
    assert "| Experts per layer [2, 3] |" in row and "2/3" not in row
    assert single.startswith("Tokens 704 | LossCE (mean of 1 step) 7.8000")
    assert experts.event_notes([dataclasses.replace(event, granularity="neuron")]) == [], "notes on its own events"
    assert "window_steps" not in (tmp_path / "training_log.csv").read_text(), "a text-line field, no column"
    assert event_line in capsys.readouterr().out


def test_the_log_window_row_counts_its_steps_and_the_csv_keeps_its_columns(tmp_path):
    cfg = tiny_config()
    window = MetricsWindow.empty("cpu", 0.0)
    micro = MicroBatchStats(loss_ce=torch.tensor(2.0), loss_lb=torch.tensor(1.0), loss_z=torch.tensor(0.1),
                            counts=torch.ones(2, 4, dtype=torch.long), balance=torch.tensor(1.0))
    plasticity = Plasticity(cfg, NemoeLM(cfg), torch.zeros(1, 17, dtype=torch.long))
    for step in range(3):
        window.add(StepResult([micro], torch.tensor(0.5), True, 1e-3))
        for layer in plasticity.experts.layers:   # what the training forward counts: 3 and 1 choices
            layer.usage_counts += torch.tensor([3, 1, 0, 0])
        plasticity.after_step(step)
    row = window.row(3, 192, 1.0, 64, 1, cfg.moe, 1.0)
    assert row["window_steps"] == 3
    # the expert columns come from the mechanism: live experts, entropy and max load of the window's shares
    extra = plasticity.log_row()
    per_expert = 2 * (32 * 48) + 48 + 32
    assert extra == {"experts_L0": 2, "experts_L1": 2, "usage_entropy_L0": round(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)), 6),
                     "usage_entropy_L1": round(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)), 6),
                     "max_load_L0": 1.5, "max_load_L1": 1.5, "expert_param_steps": 3 * 2 * 2 * per_expert}
    assert plasticity.log_row()["usage_entropy_L0"] == 0.0, "a new window starts at each row"

    def write(logger):
        logger.train_row(row | extra | {"optim_state_bytes": 0})

    (line,) = logged(tmp_path, write)
    assert "LossCE (mean of 3 steps) 2.0000" in line
    header = (tmp_path / "training_log.csv").read_text().splitlines()[0]
    assert header.split(",") == train_columns(2)


@pytest.mark.parametrize("action, text", [
    (Action("crossover", 3, (0, 1), 0.4012, 0.5), "Parents' mean usage 0.4012 | Drawn with crossover_prob 0.5"),
    (Action("graduate", 3, usage=0.2, threshold=0.05), "Usage 0.2000 >= probation_min_usage 0.05"),
    (Action("failed_probation", 3, usage=0.01, threshold=0.05), "Usage 0.0100 < probation_min_usage 0.05"),
    (Action("prune", 1, usage=0.002, threshold=0.01), "Usage 0.0020 < prune_usage 0.01"),
])
def test_an_expert_event_says_what_its_threshold_is(action, text):
    assert reading(action) == text


def test_a_scheduled_split_names_its_score_and_target():
    growth = Growth(target=4, experts_max=6, until_step=100, criterion="gradient", scores=[0.5, 0.25])
    assert growth.reading(0) == "Parent's gradient utility 0.5 | Scheduled target 4 experts"


def test_resume_with_a_near_miss_of_a_run_name_names_that_run(tmp_path):
    paths = RunPaths.of(tmp_path, "tpyo")
    rundir.refuse_if_misnamed(paths, None)   # nothing there at all: a first start goes on
    (tmp_path / "logs" / "empty").mkdir(parents=True)                   # no log, no checkpoint: not a run
    (tmp_path / "logs" / "typo").mkdir()
    (tmp_path / "logs" / "typo" / "training_log.csv").write_text("step\n")
    mirror = RunPaths.of(tmp_path / "drive", "tpyo")
    (tmp_path / "drive" / "checkpoints" / "t4").mkdir(parents=True)
    (tmp_path / "drive" / "checkpoints" / "t4" / "nemo_ckpt_step8.pt").write_bytes(b"x")
    assert rundir.other_runs(paths, mirror) == ["t4", "typo"]
    with pytest.raises(rundir.UserError) as err:
        rundir.refuse_if_misnamed(paths, mirror)
    message = str(err.value)
    assert "no run named 'tpyo'" in message and "but there is 'typo'." in message   # not t4: unlike
    assert "--run-name" in message and "leave out --resume" in message
    # A name unlike every run there is a new run (the notebook always passes --resume): it goes on.
    rundir.refuse_if_misnamed(RunPaths.of(tmp_path, "static-baseline"), mirror)
    # Its own log from an attempt killed before its first checkpoint: the name is real, it starts fresh.
    (tmp_path / "drive" / "logs" / "tpyo").mkdir(parents=True)
    (tmp_path / "drive" / "logs" / "tpyo" / "training_log.txt").write_text("")
    rundir.refuse_if_misnamed(paths, mirror)
