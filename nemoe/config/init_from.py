"""model.init_from: the model's shape from a pretrained GPT-2 source, read into the config.

A config that names a source (a Hugging Face Hub name or a save_pretrained folder) takes the
model's shape from the source's config.json (no weights), refuses conflicting settings with
one message naming both values, and gets the moe defaults under which upcycled copies compute
the source's function (nemoe/pretrained.py explains why, and imports the weights). transformers
is imported inside the functions that read a source, so a config without init_from never loads it.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from pathlib import Path

import yaml

from nemoe.config.sections import ModelConfig, MoEConfig
from nemoe.errors import UserError
from nemoe.schema import CONFIG_YAML, RunPaths, list_checkpoints

# transformers' activation_function -> model.activation (nemoe/pretrained.py maps it back for export).
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
SHAPE_KEYS = ("vocab_size", "d_model", "n_layers", "n_heads", "d_expert", "activation")
LAYER_NORM_EPS = 1e-5   # nn.LayerNorm's default, which every nemoe LayerNorm uses


# --------------------------------------------------------------------------- #
# Reading a source's config through transformers
# --------------------------------------------------------------------------- #

@contextmanager
def quiet_transformers():
    """transformers without progress bars and warnings (the run's log says what happened)."""
    from transformers.utils import logging as hf_logging
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def source_location(source: str) -> str:
    """A local folder's path, else the name as given (a Hub model id)."""
    path = Path(source).expanduser()
    return str(path) if path.exists() else source


def source_unavailable(source: str, err: BaseException) -> UserError:
    """One clear message for a source that cannot be read."""
    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
    path = Path(source).expanduser()
    if path.exists():
        return UserError(f"model.init_from {source!r}: not a model folder written by save_pretrained "
                         f"({type(err).__name__}: {first})")
    import huggingface_hub.constants
    offline = ("HF_HUB_OFFLINE=1 is set, so the Hub is not asked" if huggingface_hub.constants.HF_HUB_OFFLINE
               else "the Hub could not be reached or has no such model")
    return UserError(f"model.init_from {source!r}: no folder of that name, and the Hugging Face Hub could not "
                     f"provide it ({offline}: {type(err).__name__}: {first})\nOn a machine with network, "
                     f"download it once (it lands in the Hugging Face cache, ~/.cache/huggingface, which works "
                     f"offline afterwards), or pass a folder written by save_pretrained.")


def source_config(source: str):
    """The source's transformers config (config.json only; no weights)."""
    from transformers import AutoConfig
    try:
        with quiet_transformers():
            return AutoConfig.from_pretrained(source_location(source))
    except (OSError, ValueError) as err:
        raise source_unavailable(source, err) from None


def shape_of(hf_config, source: str) -> tuple[dict, int]:
    """(the model.* settings the source fixes, its number of positions); refuses what nemoe cannot hold."""
    kind = getattr(hf_config, "model_type", "?")
    if kind != "gpt2":
        raise UserError(f"model.init_from {source!r}: a {kind} model; nemoe imports the GPT-2 family only "
                        f"(gpt2, distilgpt2, gpt2-medium/large/xl, or a GPT2LMHeadModel saved by save_pretrained)")
    c = hf_config
    unsupported = []
    if c.activation_function not in ACTIVATIONS:
        unsupported.append(f"activation_function {c.activation_function!r} (nemoe has gelu and gelu_tanh)")
    if c.layer_norm_epsilon != LAYER_NORM_EPS:
        unsupported.append(f"layer_norm_epsilon {c.layer_norm_epsilon} (nemoe's LayerNorms use {LAYER_NORM_EPS})")
    for flag, wanted in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                         ("add_cross_attention", False), ("tie_word_embeddings", True)):
        if bool(getattr(c, flag, wanted)) != wanted:
            unsupported.append(f"{flag}={not wanted}")
    if unsupported:
        raise UserError(f"model.init_from {source!r}: this GPT-2 variant has {'; '.join(unsupported)}, "
                        f"which nemoe's model does not implement")
    shape = {"vocab_size": c.vocab_size, "d_model": c.n_embd, "n_layers": c.n_layer, "n_heads": c.n_head,
             "d_expert": c.n_inner or 4 * c.n_embd, "activation": ACTIVATIONS[c.activation_function]}
    return shape, c.n_positions


# --------------------------------------------------------------------------- #
# The config: shape from the source, conflicts, defaults of an imported model
# --------------------------------------------------------------------------- #

def adopt_source(raw: dict, resume: tuple[Path, str | None] | None = None) -> dict:
    """A raw config (YAML + --set, model.init_from set) with the model's shape taken from the source.

    A shape key the config sets to another value is an error naming both; model.seq_len may be
    shorter than the source's context, not longer. `resume` = (run dir, run name or None): a run
    being resumed that has checkpoints, in its run folder or its mirror, takes the shape its
    config.yaml recorded, without reading the source. Then the import defaults (`import_defaults`)
    fill the moe keys the config leaves out.
    """
    raw = copy.deepcopy(raw)
    model, source = raw["model"], str(raw["model"]["init_from"])
    recorded = _recorded_shape(raw, resume)
    shape, n_positions = (recorded, None) if recorded else shape_of(source_config(source), source)
    problems = []
    for key, value in shape.items():
        given = model.get(key, value)
        if key == "d_expert" and given == 0:   # 0 means 4 * d_model
            given = 4 * shape["d_model"]
        if given != value:
            problems.append(f"model.{key}: {model[key]!r} in the config, but the source {source!r} has {value!r}; "
                            f"the shape comes from the source (drop model.{key} from the config and --set)")
        model[key] = value
    seq_len = model.get("seq_len", ModelConfig().seq_len)
    if n_positions is not None and isinstance(seq_len, int) and seq_len > n_positions:
        problems.append(f"model.seq_len: {seq_len} in the config, but the source {source!r} has {n_positions} "
                        f"positions; model.seq_len may be at most that")
    if problems:
        raise UserError("invalid config:\n  - " + "\n  - ".join(problems))
    if isinstance(raw.setdefault("moe", {}), dict):
        import_defaults(raw["moe"])
    return raw


def import_defaults(moe: dict) -> None:
    """The moe settings an imported model gets where the config gives none: `experts_max: 1` is a
    dense fine-tune (one expert, top-1); otherwise top-2 routing, the rule under which upcycled
    copies compute the source's function (top-1 when a layer may hold a single expert)."""
    if moe.get("experts_max") == 1:
        for key in ("experts_init", "experts_min", "top_k"):
            moe.setdefault(key, 1)
    defaults = MoEConfig()
    least = [moe.get("experts_init", defaults.experts_init), moe.get("experts_min", defaults.experts_min)]
    if all(isinstance(n, int) for n in least):
        moe.setdefault("top_k", 2 if min(least) >= 2 else 1)


def _recorded_shape(raw: dict, resume) -> dict | None:
    """The shape keys of a resumed run's config.yaml, when the run has checkpoints (else None):
    its run folder's, or, with an empty run folder (a fresh VM), its mirror's (checkpoint.mirror_dir)."""
    if resume is None:
        return None
    run_dir, run_name = resume
    name = run_name or str(raw.get("name") or "nemoe")
    checkpoint = raw.get("checkpoint")
    mirror_dir = checkpoint.get("mirror_dir") if isinstance(checkpoint, dict) else None
    for paths in [RunPaths.of(run_dir, name)] + ([RunPaths.of(str(mirror_dir), name)] if mirror_dir else []):
        if list_checkpoints(paths.ckpt_dir) and (shape := _shape_in(paths.log_dir)) is not None:
            return shape
    return None


def _shape_in(log_dir: Path) -> dict | None:
    """The shape keys of the config.yaml in a run's log folder (None: missing or without them)."""
    try:
        saved = yaml.safe_load((log_dir / CONFIG_YAML).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    model = saved.get("model") if isinstance(saved, dict) else None
    if not isinstance(model, dict) or any(key not in model for key in SHAPE_KEYS):
        return None
    shape = {key: model[key] for key in SHAPE_KEYS}
    shape["d_expert"] = shape["d_expert"] or 4 * shape["d_model"]
    return shape
