"""What a run writes, in one place: folder layout, file names, CSV columns, checkpoint names.

The trainer writes these files and every tool reads them; both take the names
from here, so a renamed column or file changes in one line.

    <run-dir>/logs/<run-name>/          the log folder (RunPaths.log_dir)
        training_log.txt                one line per log interval, event, evaluation, ...
        training_log.csv                TRAIN columns (per layer: experts_L<i>, ...)
        events.csv                      EVENT_COLUMNS: one row per structural event
        eval.csv                        EVAL_COLUMNS: held-out loss per source and "all"
        plasticity.csv                  STATE_COLUMNS: per-unit mechanism state (long format)
        config.yaml                     the resolved config
        tensorboard/                    TensorBoard event files (tensorboard_tag() names the scalars)
        .lock                           the writer's lock (nemoe.lock)
    <run-dir>/checkpoints/<run-name>/   nemo_ckpt_step<step>.pt, the last checkpoint.keep_last
    <mirror-dir>/logs/<run-name>/, <mirror-dir>/checkpoints/<run-name>/   the mirror (nemoe/mirror.py):
                                        the same files, each checkpoint with its manifest .pt.json
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# --------------------------------------------------------------------------- #
# Run layout
# --------------------------------------------------------------------------- #

LOGS_DIR, CHECKPOINTS_DIR = "logs", "checkpoints"
TEXT_LOG = "training_log.txt"
TRAIN_CSV = "training_log.csv"
EVENTS_CSV = "events.csv"
EVAL_CSV = "eval.csv"
STATE_CSV = "plasticity.csv"
CONFIG_YAML = "config.yaml"
LOCK_FILE = ".lock"
CSV_LOGS = (TRAIN_CSV, EVENTS_CSV, EVAL_CSV, STATE_CSV)
TENSORBOARD_DIR = "tensorboard"     # in the log folder: `tensorboard --logdir <run-dir>/logs`


@dataclass(frozen=True)
class RunPaths:
    """Where one run's files live: `<run_dir>/logs/<name>` and `<run_dir>/checkpoints/<name>`."""

    run_dir: Path
    name: str

    @classmethod
    def of(cls, run_dir: str | Path, name: str) -> "RunPaths":
        return cls(Path(run_dir), name)

    @classmethod
    def from_log_dir(cls, log_dir: str | Path) -> "RunPaths":
        log_dir = Path(log_dir)
        return cls(log_dir.parent.parent, log_dir.name)

    @property
    def log_dir(self) -> Path:
        return self.run_dir / LOGS_DIR / self.name

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / CHECKPOINTS_DIR / self.name


# --------------------------------------------------------------------------- #
# Checkpoint files
# --------------------------------------------------------------------------- #

# What a checkpoint holds (its keys and format) is nemoe/checkpoint_layout.py's.
_CHECKPOINT_NAME = re.compile(r"^nemo_ckpt_step(\d+)\.pt$")


def checkpoint_name(step: int) -> str:
    return f"nemo_ckpt_step{step}.pt"


def manifest_name(checkpoint: str) -> str:
    """The mirror's manifest beside a verified copy (nemoe/mirror.py): size and SHA-256, as JSON."""
    return f"{checkpoint}.json"


def checkpoint_step(name: str) -> int | None:
    """The step in a checkpoint file name, None for any other name."""
    m = _CHECKPOINT_NAME.match(name)
    return int(m.group(1)) if m else None


def list_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint file in `directory` by name, newest first."""
    if not directory.is_dir():
        return []
    found = [(step, p) for p in directory.iterdir() if (step := checkpoint_step(p.name)) is not None]
    return sorted(found, reverse=True)


# --------------------------------------------------------------------------- #
# CSV columns
# --------------------------------------------------------------------------- #

# training_log.csv: one row per log interval (means over it), then three columns per layer.
#   grad_norm      mean over the interval's applied steps (before clipping)
#   grad_scale     the fp16 GradScaler's loss scale at the row's step (1.0 without a scaler)
#   skipped_steps  steps of the interval whose update was skipped (non-finite gradients)
#   loss_lb        the load-balance loss as the objective has it (n_live * sum f_i P_i, a ramping
#                  newborn counted as a full expert); balance: the same over the experts that can
#                  take traffic, 1.0 = even
#   rss_mb         the process's resident memory (MB) when the row was written (rank 0 under DDP)
#   expert_param_steps  cumulative: the sum over the run's steps of the parameters of the experts
#                  live at each step (every expert's w_in, b_in, w_out, b_out; router rows not counted)
#   optim_state_bytes  bytes held by the optimizer's state tensors when the row was written (one rank's)
TRAIN_COLUMNS = ["step", "tokens", "loss", "loss_ce", "loss_lb", "loss_z", "loss_lb_scaled",
                 "loss_z_scaled", "lr", "grad_norm", "grad_scale", "skipped_steps", "tokens_per_s", "elapsed_s",
                 "balance", "rss_mb", "expert_param_steps", "optim_state_bytes"]
LAYER_COLUMNS = ("experts", "usage_entropy", "max_load")   # experts_L0, usage_entropy_L0, ...


def layer_column(prefix: str, layer: int) -> str:
    return f"{prefix}_L{layer}"


def train_columns(n_layers: int) -> list[str]:
    return TRAIN_COLUMNS + [layer_column(p, i) for p in LAYER_COLUMNS for i in range(n_layers)]


# events.csv: one row per structural event at any granularity (nemoe.plasticity.Event).
#   granularity  expert | neuron | head | layer
#   event        what happened: split, crossover, prune, failed_probation, graduate (expert);
#                turnover, shrink_perturb (neuron); prune, grow, measure (head); death, birth (layer)
#   unit         what changed, e.g. e7, n3 n17, h2, L3 id5
#   expert       the expert's id (-1: not inside an expert); parents: parent ids or units
#   value        the measurement the decision compared with `threshold` (a usage share,
#                a fitness, an attention entropy, a vitality, ...); cause says which, in words
EVENT_COLUMNS = ["step", "tokens", "granularity", "event", "layer", "unit", "expert", "parents", "value",
                 "threshold", "n_before", "n_after", "probe_loss_before", "probe_loss_after", "cause"]
# Logs written before the columns were renamed: `action` is today's `event` (their `event`
# column repeated it with a prefix, e.g. evolve_split), `usage` is today's `value`.
LEGACY_EVENT_RENAMES = {"action": "event", "usage": "value"}

EVAL_COLUMNS = ["step", "tokens", "source", "loss", "ppl"]

# plasticity.csv, long format: one row per measured quantity of one unit at a log step,
# e.g. (step, tokens, layer, 3, L3, vitality, 0.81) or (step, tokens, head, 0, h2, gate, 1.0).
STATE_COLUMNS = ["step", "tokens", "granularity", "layer", "unit", "name", "value"]

# Columns the readers parse as numbers.
TRAIN_NUMERIC = [c for c in TRAIN_COLUMNS]
EVENT_NUMERIC = ["step", "tokens", "layer", "expert", "value", "threshold", "n_before", "n_after",
                 "probe_loss_before", "probe_loss_after"]
EVAL_NUMERIC = ["step", "tokens", "loss", "ppl"]
STATE_NUMERIC = ["step", "tokens", "layer", "value"]

# Every line of training_log.txt starts like this; on resume, lines after the restored step go.
TEXT_LINE = re.compile(r"^\[[^\]]*\] Step (\d+) \|")


# --------------------------------------------------------------------------- #
# TensorBoard tags (the event files in <log_dir>/tensorboard; nemoe.tensorboard_log writes them)
# --------------------------------------------------------------------------- #

# training_log.csv column -> scalar tag; per-layer columns go to moe/<prefix>/L<i>.
TB_TRAIN_TAGS = {"tokens": "progress/tokens", "elapsed_s": "progress/elapsed_s",
                 "loss": "loss/total", "loss_ce": "loss/ce", "loss_lb": "loss/load_balance",
                 "loss_z": "loss/router_z", "loss_lb_scaled": "loss/load_balance_scaled",
                 "loss_z_scaled": "loss/router_z_scaled", "lr": "optim/lr", "grad_norm": "optim/grad_norm",
                 "grad_scale": "optim/grad_scale", "skipped_steps": "optim/skipped_steps", "balance": "moe/balance",
                 "tokens_per_s": "speed/tokens_per_s", "rss_mb": "host/rss_mb",
                 "expert_param_steps": "progress/expert_param_steps", "optim_state_bytes": "optim/state_bytes"}
TB_EVENTS_TAG = "events"            # text: one table per step, events.csv's columns
TB_CONFIG_TAG = "config"            # text: the resolved config at each start (fresh or resumed)
TB_USAGE_TAG = "usage"              # histograms usage/L<i>: expert usage shares at each morph decision
_TB_LAYER_TAG = re.compile(r"^(%s)_L(\d+)$" % "|".join(LAYER_COLUMNS))


def tensorboard_tag(column: str) -> str | None:
    """The scalar tag of a training_log.csv column (None for `step`, TensorBoard's x axis)."""
    if column in TB_TRAIN_TAGS:
        return TB_TRAIN_TAGS[column]
    m = _TB_LAYER_TAG.match(column)
    return f"moe/{m.group(1)}/L{m.group(2)}" if m else None


def eval_tag(kind: str, source: str) -> str:
    """eval.csv's loss or ppl of one source ("all" = the mixture) as a scalar tag."""
    return f"heldout/{kind}/{source}"


def state_tag(granularity: str, name: str, layer: int, unit: str) -> str:
    """A plasticity.csv row as a scalar tag, e.g. plasticity/head/gate/L0.h2, plasticity/layer/vitality/L3."""
    where = f"L{layer}" if unit in ("", f"L{layer}") else f"L{layer}.{unit}"
    return f"plasticity/{granularity}/{name}/{where}"
