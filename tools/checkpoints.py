"""Checkpoints -> a model, for the tools that run one (generate, evaluate, export_hf): the
CHECKPOINT argument, the newest loadable checkpoint of a folder, the model built from it.

What a checkpoint holds is read through nemoe.checkpoint_layout's accessors.
"""

from __future__ import annotations

import argparse
import zipfile
from pathlib import Path

from nemoe import checkpoint_layout as layout
from nemoe import schema
from nemoe.config import config_from_dict
from nemoe.errors import UserError
from tools.cli import note, resolve_device
from tools.runfiles import is_log_dir

CHECKPOINT_FILES = schema.checkpoint_name("<N>")  # type: ignore[arg-type]  # in messages

def checkpoint_parser(doc: str) -> argparse.ArgumentParser:
    """A tool's argument parser that starts with the CHECKPOINT argument."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help=f"{CHECKPOINT_FILES}, a run's checkpoint/log folder (newest checkpoint), or a folder "
                        f"written by tools/export_hf.py --format nemoe")
    return p


def load_checkpoint_state(arg: str | Path) -> tuple[Path, dict]:
    """(path, state) of a checkpoint file, or of the newest loadable one in a folder.

    A folder may be `<run-dir>/checkpoints/<run-name>` or the run's log folder
    `<run-dir>/logs/<run-name>`.
    """
    from nemoe import checkpoint as ckpt   # torch: loaded only when a checkpoint is read (--help answers at once)

    path = Path(arg).expanduser()
    if not path.exists():
        raise UserError(f"{path}: no such file or folder (expected a checkpoint "
                        f"<run-dir>/{schema.CHECKPOINTS_DIR}/<run-name>/{CHECKPOINT_FILES})")
    if path.is_file():
        # torch.save writes a zip archive; anything else (a YAML file, a truncated
        # download) gets a plain message instead of torch's unpickling advice.
        if not zipfile.is_zipfile(path):
            raise UserError(f"{path}: not a nemoe checkpoint (not a complete file written by "
                            f"torch.save: truncated, or another kind of file)")
        return path, ckpt.load_checkpoint(path)
    folder = path
    if not schema.list_checkpoints(folder) and is_log_dir(folder):
        folder = schema.RunPaths.from_log_dir(folder).ckpt_dir
    if not schema.list_checkpoints(folder):
        raise UserError(f"{path}: no {CHECKPOINT_FILES} checkpoints here")
    found = ckpt.load_latest(folder, warn=note)
    if found is None:
        raise UserError(f"{folder}: none of its checkpoints could be loaded")
    return found


def load_model(arg: str | Path, device_name: str = "auto"):
    """(model in eval mode on its device, Config, checkpoint state, path) from a checkpoint.

    The model is built from the checkpoint's own config, so any expert topology
    (live slots, routing offsets) loads exactly as it was saved. A folder written by
    tools/export_hf.py --format nemoe (safetensors + JSON) loads without pickle; its
    `state` holds what the tools read: step, tokens, config and the expert records
    (checkpoint_layout.for_reading).
    """
    # torch and transformers: loaded only when a model is built (--help and a wrong flag answer at once)
    from nemoe.model import NemoeLM
    from nemoe.pretrained import is_nemoe_folder, read_nemoe

    if is_nemoe_folder(Path(arg).expanduser()):
        path = Path(arg).expanduser()
        meta, weights = read_nemoe(path)
        state = layout.for_reading(step=meta["step"], tokens=meta["tokens"], config=meta["config"],
                                   expert_records=meta["expert_records"])
    else:
        path, state = load_checkpoint_state(arg)
        weights = layout.model_weights(state)
    device = resolve_device(device_name)
    try:
        cfg = config_from_dict(layout.config(state))
    except UserError as err:
        raise UserError(f"{path}: its saved config no longer validates: {err}") from None
    model = NemoeLM(cfg)
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        raise UserError(f"{path}: weights do not match the model its config describes: "
                        f"{str(err).splitlines()[0]}") from None
    return model.to(device).eval(), cfg, state, path
