"""A run's folder: one writer, leftovers of cut-off writes, which checkpoint to resume.

`RunDir.open()` is the start-up policy: refuse to overwrite a run without
--resume, take the lock, remove temporaries left by a kill (in the mirror too),
choose the newest checkpoint that loads and fits this config, from the run folder
or the mirror (a mirrored copy must match its manifest; every data-parallel rank
takes rank 0's choice), bring the mirror's logs to an empty local folder, and
explain what it did in notes for the text log.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from nemoe import checkpoint as ckpt
from nemoe import checkpoint_layout as layout
from nemoe import distributed as dist
from nemoe.config import config_changes, is_unsafe
from nemoe.errors import UserError
from nemoe import mirror as mirror_module
from nemoe.files import remove_temporaries
from nemoe.lock import RunLock
from nemoe.schema import TENSORBOARD_DIR, TEXT_LOG, TRAIN_CSV, RunPaths, list_checkpoints


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def incompatibility(state: dict, cfg_dict: dict, world_size: int, allow_config_change: bool) -> str | None:
    """Why a checkpoint cannot be resumed under this config and world size (None: it can)."""
    saved_world = layout.world_size(state)
    if saved_world != world_size:
        # Each rank's data state is its own document stream: no resharding to another count.
        return (f"written by {saved_world} data-parallel process(es), this run has {world_size}; resume "
                f"with the same torchrun --nproc_per_node ({saved_world}), or start a new run")
    saved_tokenizer = layout.config(state).get("data", {}).get("tokenizer", "gpt2")
    if saved_tokenizer != cfg_dict["data"]["tokenizer"]:
        return (f"trained with data.tokenizer {saved_tokenizer}, this config has {cfg_dict['data']['tokenizer']}: "
                f"a run resumes only with its own tokenizer (--set data.tokenizer={saved_tokenizer}), "
                "even with --allow-config-change")
    unsafe = [c for c in config_changes(layout.config(state), cfg_dict) if is_unsafe(c[0])]
    if not unsafe or allow_config_change:
        return None
    keep = " ".join(f"--set {key}={old}" for key, old, _ in unsafe if isinstance(old, (int, float, str, bool)))
    return "written by an incompatible config: " + "; ".join(
        f"{key}: {_short(old)} -> {_short(new)}" for key, old, new in unsafe) + (
        f" (to continue under the checkpoint's settings: {keep})" if keep else "")


def change_notes(state: dict, cfg_dict: dict) -> tuple[list[str], bool]:
    """(log notes on every setting changed since the checkpoint, whether the data stream must restart)."""
    changes = config_changes(layout.config(state), cfg_dict)
    notes = [f"config change on resume: {key}: {_short(old)} -> {_short(new)}"
             + (" (unsafe, allowed by --allow-config-change)" if is_unsafe(key) else "")
             for key, old, new in changes]
    data_changed = any(key.startswith("data.") and is_unsafe(key) for key, _, _ in changes)
    if data_changed:
        notes.append("data settings changed: the data stream starts from its beginning")
    return notes, data_changed


# How alike a name must be to an existing run's to be taken for a typo of it (difflib's ratio:
# 'tinny'/'tiny' 0.89, 'locla'/'local' 0.8, 'static'/'local' 0.18).
NEAR_MISS = 0.75


def _and_mirror(paths: RunPaths, mirror: RunPaths | None) -> list[RunPaths]:
    return [paths] + ([mirror] if mirror else [])


def other_runs(paths: RunPaths, mirror: RunPaths | None = None) -> list[str]:
    """Names of the runs other than `paths.name` in its run folder (and the mirror): folders under
    checkpoints/ with a checkpoint, or under logs/ with a training log."""
    names = set()
    for base in _and_mirror(paths, mirror):
        for folder in (base.ckpt_dir.parent, base.log_dir.parent):
            if folder.is_dir():
                names.update(d.name for d in folder.iterdir() if d.is_dir() and d.name != paths.name and (
                    list_checkpoints(d) or (d / TRAIN_CSV).is_file() or (d / TEXT_LOG).is_file()))
    return sorted(names)


def refuse_if_misnamed(paths: RunPaths, mirror: RunPaths | None) -> None:
    """--resume found no checkpoint of this run: where this name is a near miss of a run that
    exists (`tinny` beside `tiny`) and this run never logged a line, it is likely mistyped, so stop
    rather than start a new run beside it. A name unlike every run there (a new experiment: the
    Colab notebook always passes --resume), nothing there at all (a first start), or this run's
    own logs (killed before its first checkpoint): go on, fresh."""
    if any((p.log_dir / log).is_file() for p in _and_mirror(paths, mirror) for log in (TEXT_LOG, TRAIN_CSV)):
        return
    near = difflib.get_close_matches(paths.name, other_runs(paths, mirror), n=3, cutoff=NEAR_MISS)
    if not near:
        return
    where = str(paths.run_dir) + (f" and {mirror.run_dir}" if mirror else "")
    raise UserError(f"--resume: there is no run named {paths.name!r} in {where}, but there is "
                    f"{' and '.join(repr(n) for n in near)}. To continue it, pass that name with --run-name; "
                    f"to start {paths.name!r} as a new run, leave out --resume once.")


class RunDir:
    def __init__(self, paths: RunPaths, info: dist.DistInfo, mirror_dir: str | None = None):
        """mirror_dir: checkpoint.mirror_dir (its run folders are RunPaths.of(mirror_dir, paths.name))."""
        self.paths, self.info = paths, info
        self.mirror = RunPaths.of(mirror_dir, paths.name) if mirror_dir else None
        self.lock = RunLock(paths.log_dir)

    def open(self, resume: bool, reject) -> tuple[tuple[Path, dict] | None, list[str]]:
        """(the checkpoint to continue from or None, notes). Collective: a failure on any rank
        stops all of them together (no rank left waiting); rank 0 alone takes the lock.

        reject(state) -> why this checkpoint cannot be resumed, or None.
        """
        error, found, notes = None, None, []
        try:
            existing = list_checkpoints(self.paths.ckpt_dir)
            mirrored = list_checkpoints(self.mirror.ckpt_dir) if self.mirror else []
            for folder, found_there in ((self.paths.ckpt_dir, existing), (self.mirror and self.mirror.ckpt_dir, mirrored)):
                if found_there and not resume:
                    raise UserError(f"run folder {folder} already has checkpoints (newest: step {found_there[0][0]}); "
                                    "add --resume to continue it, or pick a new --run-name")
            existing = existing + mirrored
            if resume and not existing:
                refuse_if_misnamed(self.paths, self.mirror)   # before the lock makes this run's folder
            if self.info.is_main:
                self.lock.acquire()
            try:
                found, notes = self._choose(resume, existing, reject)
            except BaseException:
                self.lock.release()
                raise
        except (UserError, OSError) as err:
            error = err
        dist.agree_or_raise(error)
        return found, notes

    def _choose(self, resume: bool, existing: list, reject):
        notes = []
        folders = [self.paths] + ([self.mirror] if self.mirror else [])
        if self.info.is_main:
            for leftover in [p for f in folders for d in (f.ckpt_dir, f.log_dir, f.log_dir / TENSORBOARD_DIR)
                             for p in remove_temporaries(d)]:
                where = "" if leftover.parent in (self.paths.ckpt_dir, self.paths.log_dir) else f" in {leftover.parent}"
                notes.append(f"removed {leftover.name}{where}, left by a write that was cut off")
        if not resume:
            return None, notes
        also = (self.mirror.ckpt_dir, mirror_module.verify) if self.mirror else None
        found = ckpt.load_latest(self.paths.ckpt_dir, warn=lambda m: notes.append(f"skipping {m}"), reject=reject,
                                 also=also)
        # Every rank must continue from the same checkpoint: rank 0's choice holds.
        chosen = dist.broadcast_object(None if found is None else str(found[0]))
        if (None if found is None else str(found[0])) != chosen:
            found = None if chosen is None else (Path(chosen), ckpt.load_checkpoint(Path(chosen)))
        where = " and ".join(str(f.ckpt_dir) for f in folders)
        if found is None and existing:
            hint = ("\nTo resume under the changed settings anyway, add --allow-config-change "
                    "(parameter shapes must still match)." if any("config" in n for n in notes) else "")
            raise UserError(f"--resume: none of the {len(existing)} checkpoints in {where} "
                            f"can be used; nothing was deleted:\n  - " + "\n  - ".join(notes) + hint)
        if found is None:
            notes.append(f"--resume: no checkpoint in {where} yet, starting fresh")
        elif self.mirror and found[0].parent == self.mirror.ckpt_dir:
            notes.append(f"using the mirror's verified copy {found[0]} (the run folder has nothing newer that loads)")
            if self.info.is_main:
                for name in mirror_module.restore_logs(self.mirror, self.paths):
                    notes.append(f"copied {name} from the mirror into the empty run folder")
        return found, notes

    def heartbeat(self) -> None:
        self.lock.heartbeat()

    def close(self) -> None:
        self.lock.release()
