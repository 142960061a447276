"""What a checkpoint holds and where: its layout is built, read and upgraded here, and nowhere else.

The trainer builds a checkpoint with `new` and `rank_part`; `read` checks a loaded file
(and upgrades an older format); the trainer, nemoe/pretrained.py, nemoe/rundir.py and the
tools read it through the accessors below. No other module spells the nested keys (a
test holds it so), so the layout changes in this file alone. nemoe/checkpoint.py does the
file work (atomic writes, keep-last-k, the newest one that loads, background saves).

Format v2 (FORMAT): the components' states by name, plus the run's progress.

    format                  FORMAT (added when the file is written, `stamped`)
    step, tokens, elapsed   progress (elapsed: training seconds over every resume)
    world_size              data-parallel processes that wrote it
    config                  the resolved config
    train_module            model, optimizer, scaler, bad_steps
    ranks                   per rank: rng, data (stream position), metrics (the open
                            log window's losses), plasticity (each mechanism's state by its
                            config key, with this rank's statistics since the last decision
                            and the last log row; the expert mechanism's under EXPERTS, its
                            expert records and live-expert parameter-steps included)

v1 files (V1_FORMAT: one flat dict, written before the components existed) load through
`upgrade_v1`; v2 files written while the trainer kept the expert reports itself (a top-level
`expert_param_steps`, the routing counts in the log window) through `upgrade_expert_reports`.
"""

from __future__ import annotations

from nemoe.errors import UserError

FORMAT = "nemoe-checkpoint-v2"
V1_FORMAT = "nemoe-checkpoint-v1"
# The expert mechanism's key among a rank's plasticity states: its config_key
# (nemoe.plasticity.experts.ExpertMorphogenesis; a test holds the two equal).
EXPERTS = "experts"

_REQUIRED = ("step", "tokens", "elapsed", "world_size", "config", "train_module", "ranks")
_REQUIRED_V1 = ("step", "model", "optimizer", "controller", "trainer", "data", "config", "rng")


# --------------------------------------------------------------------------- #
# Writing
# --------------------------------------------------------------------------- #

def new(*, step: int, tokens: int, elapsed: float, world_size: int, config: dict, train_module: dict,
        ranks: list[dict]) -> dict:
    """A checkpoint: the progress, the resolved config, the train module's state and every rank's
    part (`rank_part`, gathered from all ranks)."""
    return {"step": step, "tokens": tokens, "elapsed": elapsed, "world_size": world_size,
            "config": config, "train_module": train_module, "ranks": ranks}


def rank_part(*, rng, data: dict, metrics: dict, plasticity: dict) -> dict:
    """One rank's own part of a checkpoint: its RNG, data position, open log window and
    plasticity states (by mechanism config key)."""
    return {"rng": rng, "data": data, "metrics": metrics, "plasticity": plasticity}


def stamped(state: dict) -> dict:
    """`state` as written to a file: the format first."""
    return {"format": FORMAT, **state}


# --------------------------------------------------------------------------- #
# Reading and upgrading
# --------------------------------------------------------------------------- #

def read(raw, path) -> dict:
    """A loaded file's contents as a checkpoint of today's format (v1 upgraded); UserError
    naming `path` if it is not a nemoe checkpoint."""
    fmt = raw.get("format") if isinstance(raw, dict) else None
    if fmt == V1_FORMAT and all(k in raw for k in _REQUIRED_V1):
        return upgrade_expert_reports(upgrade_v1(raw))
    if fmt != FORMAT or any(k not in raw for k in _REQUIRED):
        raise UserError(f"{path}: not a nemoe checkpoint (expected format {FORMAT})")
    return upgrade_expert_reports(raw)


def upgrade_expert_reports(state: dict) -> dict:
    """The expert reports where the expert mechanism keeps them now: the top-level
    `expert_param_steps` (absent in files older still: the mechanism counts those steps at the
    experts live on resume, and says so) and each rank's log-window routing `counts` move into
    the rank's EXPERTS state (`param_steps`, `window_counts`). A file written since is unchanged."""
    param_steps = state.pop("expert_param_steps", None)
    for part in state["ranks"]:
        experts = part.get("plasticity", {}).get(EXPERTS)
        counts = part.get("metrics", {}).pop("counts", None)
        if experts is None:
            continue
        if counts is not None:
            experts.setdefault("window_counts", list(counts))
        if param_steps is not None:
            experts.setdefault("param_steps", param_steps)
    return state


def upgrade_v1(old: dict) -> dict:
    """A v1 checkpoint as v2: the same state, regrouped by component."""
    t = old["trainer"]
    config = dict(old["config"])
    world_size = config.pop("world_size", 1)
    ranks = old.get("ranks") or [{"rng": old["rng"], "data": old["data"], "window": t["window"],
                                  "plasticity": old.get("plasticity", {})}]
    return {"format": FORMAT, "step": old["step"], "tokens": t["tokens"], "elapsed": t["elapsed"],
            "world_size": world_size, "config": config,
            "train_module": {"model": old["model"], "optimizer": old["optimizer"], "scaler": old["scaler"],
                             "bad_steps": t["bad_steps"]},
            "ranks": [{"rng": r["rng"], "data": r["data"], "metrics": r["window"],
                       "plasticity": {**r.get("plasticity", {}),
                                      # single-process v1 kept the usage counts in the model buffers only
                                      EXPERTS: {**old["controller"], **({"usage_counts": r["usage_counts"]}
                                                                       if "usage_counts" in r else {})}}}
                      for r in ranks]}


# --------------------------------------------------------------------------- #
# Accessors
# --------------------------------------------------------------------------- #

def step(state: dict) -> int:
    return state["step"]


def tokens(state: dict) -> int:
    return state["tokens"]


def elapsed(state: dict) -> float:
    return state["elapsed"]


def world_size(state: dict) -> int:
    """Data-parallel processes that wrote it (each rank's data position is its own)."""
    return state["world_size"]


def config(state: dict) -> dict:
    """The resolved config it was written under, as nested dicts."""
    return state["config"]


def train_module(state: dict) -> dict:
    """The train module's state (model, optimizer, scaler, bad_steps): TrainModule.load_state_dict's."""
    return state["train_module"]


def model_weights(state: dict) -> dict:
    """The model's state dict."""
    return state["train_module"]["model"]


def optimizer_state(state: dict) -> dict:
    """The optimizer's state dict."""
    return state["train_module"]["optimizer"]


def ranks(state: dict) -> list[dict]:
    """Every rank's own part (rank_part), in rank order."""
    return state["ranks"]


def rank_rng(state: dict, rank: int):
    return state["ranks"][rank]["rng"]


def rank_data(state: dict, rank: int) -> dict:
    """The rank's data stream position (TokenStream.load_state_dict's)."""
    return state["ranks"][rank]["data"]


def rank_metrics(state: dict, rank: int) -> dict:
    """The rank's open log window (MetricsWindow.from_state's)."""
    return state["ranks"][rank]["metrics"]


def rank_plasticity(state: dict, rank: int) -> dict:
    """The rank's plasticity states by mechanism config key (Plasticity.load_state_dict's)."""
    return state["ranks"][rank]["plasticity"]


def expert_state(state: dict, rank: int = 0) -> dict:
    """The expert mechanism's state on `rank`."""
    return state["ranks"][rank]["plasticity"][EXPERTS]


def expert_records(state: dict, rank: int = 0) -> list[list[dict | None]]:
    """Per layer, per slot: the expert record (id, parents, origin, ...) as a dict, None for a
    free slot. Every rank holds the same records."""
    return expert_state(state, rank)["records"]


def for_reading(*, step: int, tokens: int, config: dict, expert_records: list) -> dict:
    """A checkpoint with only what the tools read besides the weights (progress, config, expert
    records): for a model exported without its training state (nemoe/pretrained.py's format)."""
    return {"step": step, "tokens": tokens, "config": config,
            "ranks": [{"plasticity": {EXPERTS: {"records": expert_records}}}]}


def replicated(state: dict, rank: int) -> dict:
    """The part of a checkpoint every data-parallel replica must hold identically: weights and
    buffers, optimizer state and expert records (not the per-rank usage counts, data positions,
    RNG or statistics since the last decision)."""
    experts = expert_state(state, rank)
    return {"model": {k: v for k, v in model_weights(state).items() if not k.endswith("usage_counts")},
            "optimizer": optimizer_state(state),
            "experts": {k: v for k, v in experts.items() if k not in ("usage_counts", "window_counts")}}
