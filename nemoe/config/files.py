"""Config files and command-line overrides: finding a config, reading its YAML, `--set`, loading.

`load_config` is the whole path from a name on the command line to a validated Config
(nemoe/config/sections.py); with model.init_from set, the model's shape is read from the
source first (nemoe/config/init_from.py).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from nemoe.config.init_from import adopt_source
from nemoe.config.sections import Config, alias_key, config_from_dict, normalise
from nemoe.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def find_config(name: str) -> Path:
    """`NAME`, `configs/NAME` or `configs/NAME.yaml` (relative to cwd, then to the repo)."""
    candidates = []
    for base in (Path.cwd(), CONFIG_DIR.parent):
        candidates += [base / name, base / "configs" / name, base / "configs" / f"{name}.yaml"]
    for path in candidates:
        if path.is_file():
            return path
    shipped = sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))
    raise UserError(f"config {name!r} not found (looked for {name}, configs/{name}, "
                    f"configs/{name}.yaml); shipped configs: {', '.join(shipped)}")


def read_yaml(path: Path) -> dict:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML: {err}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot read: {err}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of config sections at the top level")
    return raw


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `section.key=value` strings; values are parsed as YAML scalars. Old section spellings
    (sections.ALIASES: `morph.interval=7`), in `raw` or in a key, are read as their sections now."""
    raw = normalise(raw)
    problems = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.lr=3e-4")
            continue
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text
        node = raw
        parts = alias_key(key.strip()).split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part, {}), dict):
                problems.append(f"--set {key}: {part} is not a section")
                break
            node = node.setdefault(part, {})
        else:
            node[parts[-1]] = value
    if problems:
        raise UserError("invalid --set:\n  - " + "\n  - ".join(problems))
    return raw


def load_config(name: str | None, overrides: list[str] = (),
                resume: tuple[Path, str | None] | None = None) -> Config:
    """Resolve, read, override and validate a config; `None` means local.yaml.

    With model.init_from set, the model's shape comes from that source (nemoe/config/init_from.py);
    `resume` = (run dir, --run-name or None) of a run being resumed: if it has checkpoints, the shape is
    the one its config.yaml recorded and the source is not read.
    """
    path = find_config(name or "local.yaml")
    raw = read_yaml(path)
    raw.setdefault("name", path.stem)
    raw = apply_overrides(raw, list(overrides))
    if isinstance(raw.get("model"), dict) and raw["model"].get("init_from"):
        raw = adopt_source(raw, resume)   # transformers is imported only for this (in source_config)
    return config_from_dict(raw)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
