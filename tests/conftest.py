"""Shared fixtures: tiny configs and models (CPU, fp32, fixed seeds)."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from nemoe.config import config_from_dict

REPO = __import__("pathlib").Path(__file__).resolve().parent.parent


def tiny_config(**sections):
    """A tiny valid Config; `sections` override whole keys, e.g. moe={"top_k": 2}."""
    raw = {
        "model": {"vocab_size": 32, "d_model": 32, "n_layers": 2, "n_heads": 4, "seq_len": 16,
                  "d_expert": 48},
        "moe": {"experts_init": 2, "experts_min": 2, "experts_max": 4, "top_k": 1},
        "train": {"device": "cpu", "seed": 0},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return config_from_dict(raw)


@contextmanager
def deterministic_algorithms(warn_only: bool = True):
    """Deterministic algorithms on inside the block; the previous setting (on/off and
    warn-only) comes back after it, so no test leaks the mode into the next one."""
    was_on = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=warn_only)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_on, warn_only=was_warn_only)


@pytest.fixture(autouse=True, scope="session")
def _deterministic_session():
    """On for the whole session too, so module-scoped fixtures (the trainer runs) get
    the same mode as the tests that compare against them."""
    with deterministic_algorithms(warn_only=True):
        yield


@pytest.fixture(autouse=True)
def _deterministic(_deterministic_session):
    """Seed 0 and deterministic algorithms for each test; whatever a test does to the
    mode is undone after it."""
    torch.manual_seed(0)
    with deterministic_algorithms(warn_only=True):
        yield



@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """One intra-op thread for the whole session, restored at the end.

    The tests use tiny shapes, where a second thread buys little, and on a shared
    2-core machine it costs a lot: _fit_random_tokens in test_model.py ran about 5x
    slower with two threads than with one while other jobs were running. Subprocess
    tests (the CLI, torchrun) are not affected.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tok():
    """The GPT-2 tokenizer (its encoding is built once per process: nemoe.tokenizer caches it)."""
    from nemoe.tokenizer import get_tokenizer
    return get_tokenizer("gpt2")


@pytest.fixture(scope="session")
def resumed_tiny(tmp_path_factory):
    """The run folder of a TINY run (tests/test_trainer.py) of 24 steps in three invocations:
    13 steps, the step-13 checkpoint lost as if the VM died before it landed (so the first
    resume goes back to step 10, drops rows 11-13 and replays them), then --resume to 20 and
    --resume to 24. Built once, read by several tests (test_trainer compares it bit for bit
    with an uninterrupted run; test_tools and test_tensorboard read its logs and checkpoints):
    a test must not write into it."""
    from tests.test_trainer import run

    run_dir = tmp_path_factory.mktemp("resumed_tiny")
    assert run(run_dir, "--max-steps", "13") == 0
    (run_dir / "checkpoints" / "tiny" / "nemo_ckpt_step13.pt").unlink()
    assert run(run_dir, "--resume", "--max-steps", "20") == 0
    assert run(run_dir, "--resume", "--max-steps", "24") == 0
    return run_dir


@pytest.fixture
def saved_figures(monkeypatch):
    """The matplotlib Figures the code under test saves, in order (still written to disk),
    so a test can check what a tool's main() drew, not only that a file appeared."""
    from matplotlib.figure import Figure

    saved, savefig = [], Figure.savefig

    def record(fig, *args, **kwargs):
        saved.append(fig)
        return savefig(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record)
    return saved


def act(mechanism, optimizer, step: int, tokens: int = 0, probe_loss=lambda: 1.0, expert_id=None):
    """Run one mechanism's act() as nemoe.plasticity.Plasticity does, outside a trainer."""
    from nemoe.plasticity import ActContext, Probe
    if expert_id is None:
        expert_id = getattr(mechanism, "expert_id", lambda layer, slot: -1)
    return mechanism.act(ActContext(optimizer, step, tokens, Probe(probe_loss), expert_id))


# --------------------------------------------------------------------------- #
# pytest-xdist: tests that share an expensive fixture run on one worker
# --------------------------------------------------------------------------- #

def _shared_fixtures(item) -> list[str]:
    """The module-, package- or session-scoped fixtures of this project that `item` asks for,
    directly or through other fixtures, as "<where defined>::<name>". Autouse fixtures
    (settings such as one thread or a patched sleep, cheap to repeat) and pytest's own
    (tmp_path_factory) are left out."""
    defs = item._fixtureinfo.name2fixturedefs
    todo, seen, shared = list(item._fixtureinfo.argnames), set(), []
    while todo:
        name = todo.pop()
        if name in seen or name not in defs:
            continue
        seen.add(name)
        fixturedef = defs[name][-1]
        if fixturedef.has_location and fixturedef.scope != "function":
            shared.append(f"{fixturedef.baseid}::{name}")
        todo.extend(fixturedef.argnames)
    return shared


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Under `pytest -n N` (pytest-xdist, with `--dist loadgroup` from pyproject.toml), the
    tests that share a module- or session-scoped fixture (a trainer run, a benchmark report)
    go to the same worker, so the fixture is built once rather than once per worker; every
    other test goes to whichever worker is free. Tests linked through any shared fixture
    form one group (union-find over the fixtures)."""
    if not config.pluginmanager.hasplugin("xdist"):
        return
    parent: dict[str, str] = {}

    def root(key: str) -> str:
        while parent.setdefault(key, key) != key:
            parent[key] = parent[parent[key]]
            key = parent[key]
        return key

    shared = {item: _shared_fixtures(item) for item in items}
    for keys in shared.values():
        for key in keys[1:]:
            parent[root(key)] = root(keys[0])
    for item, keys in shared.items():
        if keys:
            item.add_marker(pytest.mark.xdist_group(root(keys[0])))
