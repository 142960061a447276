"""Run configuration: the sections (nested dataclasses), YAML files, `--set` overrides.

A config is built in three layers: the dataclass defaults, a YAML file that overrides
some of them, and `--set section.key=value` overrides from the command line. Every
problem found on the way (unknown keys, wrong types, impossible values) is collected
and raised once as a `UserError`, so a user fixes them all in one go (litgpt style).

Each field says what it may hold where it is declared (lib.py does the checking): its
type (`Literal[...]` for choices), its bounds and whether it is unsafe to change on
resume (`setting(...)`), and a docstring: the fields and their docstrings are the
config reference. Rules across fields live in the section's `check(cfg)`. Seeds:
`train.seed` is the run seed; every other section's seed left at None is derived from
it when the Config is built (`lib.derive_seed`).

The package, one module per concern; it imports no data or model library (torch,
datasets, transformers: tests/test_import_graph.py checks it), so the config of a run
can be read and checked anywhere:

    lib.py         the generic machinery: typed fields with bounds, building, validation
    sections.py    the root Config, its sections (model, moe, train, log, eval, checkpoint),
                   validation of a whole config, old spellings (ALIASES), resume safety
    plasticity.py  the plasticity section (experts, neuron, heads, layers)
    data.py        the data section (the sources of the mixture)
    files.py       finding a config, YAML, --set overrides, load_config
    init_from.py   model.init_from: the model's shape from a pretrained source

Every public name is importable from `nemoe.config` itself.
"""

from nemoe.config.data import DataConfig, SourceConfig
from nemoe.config.files import CONFIG_DIR, apply_overrides, dump_config, find_config, load_config, read_yaml
from nemoe.config.lib import setting
from nemoe.config.plasticity import (ExpertPlasticityConfig, HeadPlasticityConfig, LayerPlasticityConfig, MorphConfig,
                                     NeuronPlasticityConfig, PlasticityConfig)
from nemoe.config.sections import (ALIASES, RETIRED_KEYS, CheckpointConfig, Config, EvalConfig, LogConfig, ModelConfig,
                                   MoEConfig, TrainConfig, config_changes, config_from_dict, is_unsafe, normalise)

__all__ = ["ALIASES", "CONFIG_DIR", "RETIRED_KEYS", "CheckpointConfig", "Config", "DataConfig", "EvalConfig",
           "ExpertPlasticityConfig", "HeadPlasticityConfig", "LayerPlasticityConfig", "LogConfig", "ModelConfig",
           "MoEConfig", "MorphConfig", "NeuronPlasticityConfig", "PlasticityConfig", "SourceConfig", "TrainConfig", "apply_overrides",
           "config_changes", "config_from_dict", "dump_config", "find_config", "is_unsafe", "load_config",
           "normalise", "read_yaml", "setting"]
