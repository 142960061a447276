"""The checkpoint's layout lives in nemoe/checkpoint_layout.py alone: its accessors, the file it
makes, the v1 upgrade, and a guard that no other module spells its nested keys."""

from __future__ import annotations

import re

import pytest
import torch

from nemoe import checkpoint as ckpt
from nemoe import checkpoint_layout as layout
from nemoe.errors import UserError
from nemoe.plasticity.experts import ExpertMorphogenesis
from tests.conftest import REPO

# What spelling the layout looks like: its own top-level keys as strings or subscripts, a
# chain of two of its nested keys, or a format string. (A rank's plasticity part is reached
# through "ranks", caught on its own: `["plasticity"]["experts"]` alone is also the config's
# path to the expert section, so that pair is not a layout spelling.)
_PAIRS = [(a, b) for a in ("plasticity", "experts", "records", "model", "optimizer", "rng", "data", "metrics")
          for b in ("experts", "records", "model", "optimizer", "state", "usage_counts", "rng", "data", "metrics",
                    "plasticity") if (a, b) != ("plasticity", "experts")]
_SPELLINGS = re.compile("|".join([
    r"""["'](ranks|train_module)["']""",
    r"""\[\s*["'](world_size|elapsed)["']\s*\]""",
    *[rf"""\[\s*["']{a}["']\s*\]\s*\[\s*["']{b}["']\s*\]""" for a, b in _PAIRS],
    r"""nemoe-checkpoint-v\d""",
]))


def _spellings(text: str) -> list[str]:
    return [m.group(0) for m in _SPELLINGS.finditer(text)]


def test_the_guard_catches_the_old_spellings_and_passes_other_nested_reads():
    caught = ['state["ranks"][0]["plasticity"]["experts"]["records"]', "state['train_module']['model']",
              'part["metrics"]["plasticity"]', 'experts["records"]["model"]', 'fmt == "nemoe-checkpoint-v1"',
              'saved = state["world_size"]']
    for text in caught:
        assert _spellings(text), text
    for text in ('config["model"]["n_layers"]', 'raw["model"]["init_from"]', 't4["train"]["grad_accum"]',
                 'raw["plasticity"]["experts"]["interval"] = 5', 'row["expert_param_steps"] = 1',
                 'RETIRED_KEYS = ("world_size",)'):
        assert not _spellings(text), text


def test_no_module_but_the_layout_spells_the_checkpoint_keys():
    sources = [*(REPO / "nemoe").rglob("*.py"), *(REPO / "tools").rglob("*.py"), REPO / "train_nemoe.py"]
    assert len(sources) > 40
    found = {}
    for path in sources:
        if path == REPO / "nemoe" / "checkpoint_layout.py":
            continue
        hits = _spellings(path.read_text(encoding="utf-8"))
        if hits:
            found[str(path.relative_to(REPO))] = hits
    assert found == {}, "read and build checkpoints through nemoe.checkpoint_layout's accessors"


def test_the_expert_key_is_the_mechanisms_own():
    assert layout.EXPERTS == ExpertMorphogenesis.config_key


def _state():
    records = [[{"id": 0, "parents": [], "origin": "init"}, None], [None, {"id": 1, "parents": [], "origin": "init"}]]
    ranks = [layout.rank_part(rng={"torch": torch.tensor([r], dtype=torch.uint8)}, data={"position": 10 + r},
                              metrics={"steps": r},
                              plasticity={layout.EXPERTS: {"records": records, "next_id": 2,
                                                           "usage_counts": torch.full((2, 2), float(r)),
                                                           "window_counts": [torch.full((2,), r)] * 2,
                                                           "param_steps": 99},
                                          "heads": {"gate": r}})
             for r in range(2)]
    return layout.new(step=5, tokens=640, elapsed=1.5, world_size=2, config={"model": {}},
                      train_module={"model": {"w": torch.ones(2), "blocks.0.moe.usage_counts": torch.zeros(2)},
                                    "optimizer": {"state": {}}, "scaler": {}, "bad_steps": 0},
                      ranks=ranks)


def test_the_accessors_read_what_new_and_rank_part_wrote():
    state = _state()
    assert (layout.step(state), layout.tokens(state), layout.elapsed(state)) == (5, 640, 1.5)
    assert layout.world_size(state) == 2 and layout.config(state) == {"model": {}}
    assert layout.train_module(state)["bad_steps"] == 0
    assert torch.equal(layout.model_weights(state)["w"], torch.ones(2))
    assert layout.optimizer_state(state) == {"state": {}}
    assert len(layout.ranks(state)) == 2
    assert layout.rank_data(state, 1) == {"position": 11} and layout.rank_metrics(state, 1) == {"steps": 1}
    assert torch.equal(layout.rank_rng(state, 1)["torch"], torch.tensor([1], dtype=torch.uint8))
    assert layout.rank_plasticity(state, 0)["heads"] == {"gate": 0}
    assert layout.expert_state(state, 1)["next_id"] == 2 and layout.expert_state(state, 1)["param_steps"] == 99
    assert layout.expert_records(state)[1][1]["id"] == 1 and layout.expert_records(state, 1)[0][1] is None


def _as_trainer_reports(state: dict, param_steps: int | None) -> dict:
    """A v2 file as written while the trainer kept the expert reports: the parameter-steps at the
    top level (or nowhere, older still), the routing counts in each rank's log window."""
    old = {**state, "ranks": []}
    if param_steps is not None:
        old["expert_param_steps"] = param_steps
    for r, part in enumerate(layout.ranks(state)):
        experts = {k: v for k, v in part["plasticity"][layout.EXPERTS].items() if k not in ("window_counts", "param_steps")}
        old["ranks"].append({**part, "metrics": {**part["metrics"], "counts": torch.full((2, 2), 10 + r)},
                             "plasticity": {**part["plasticity"], layout.EXPERTS: experts}})
    return {"format": layout.FORMAT, **old}


def test_a_file_from_when_the_trainer_kept_the_expert_reports_reads_in_todays_layout():
    upgraded = layout.read(_as_trainer_reports(_state(), 77), "x.pt")
    assert "expert_param_steps" not in upgraded
    for r in range(2):
        experts = layout.expert_state(upgraded, r)
        assert experts["param_steps"] == 77
        assert torch.equal(torch.stack(experts["window_counts"]), torch.full((2, 2), 10 + r)), "each rank its own"
        assert layout.rank_metrics(upgraded, r) == {"steps": r}, "the window keeps its losses, not the counts"
    older = layout.read(_as_trainer_reports(_state(), None), "x.pt")
    assert "param_steps" not in layout.expert_state(older), "before the count: the mechanism counts and notes it"
    today = _state()
    assert layout.read({"format": layout.FORMAT, **today}, "x.pt") == {"format": layout.FORMAT, **today}


def test_replicated_leaves_out_what_each_rank_holds_alone():
    state = _state()
    one, two = layout.replicated(state, 0), layout.replicated(state, 1)
    assert list(one) == ["model", "optimizer", "experts"]
    assert list(one["model"]) == ["w"] and not {"usage_counts", "window_counts"} & set(one["experts"])
    assert one["experts"] == two["experts"]


def test_for_reading_holds_what_the_tools_read():
    state = layout.for_reading(step=7, tokens=70, config={"a": 1}, expert_records=[[{"id": 3}]])
    assert (layout.step(state), layout.tokens(state), layout.config(state)) == (7, 70, {"a": 1})
    assert layout.expert_records(state) == [[{"id": 3}]]


def test_the_file_keeps_its_key_order_and_loads_as_written(tmp_path):
    """What save_checkpoint writes: the format first, then the keys in the order the trainer
    has always written them (a reordering would change the file's bytes)."""
    path = ckpt.save_checkpoint(tmp_path, _state(), keep_last=2)
    raw = torch.load(path, weights_only=True)
    assert list(raw) == ["format", "step", "tokens", "elapsed", "world_size", "config", "train_module", "ranks"]
    assert raw["format"] == layout.FORMAT and list(raw["ranks"][0]) == ["rng", "data", "metrics", "plasticity"]
    loaded = ckpt.load_checkpoint(path)
    assert layout.expert_records(loaded) == layout.expert_records(_state())


@pytest.mark.parametrize("raw", [[1, 2], {"format": "nemoe-checkpoint-v3", "step": 1},
                                 {"format": layout.FORMAT, "step": 1, "tokens": 0}])
def test_read_refuses_what_is_not_a_checkpoint(raw):
    with pytest.raises(UserError, match=r"x\.pt: not a nemoe checkpoint \(expected format nemoe-checkpoint-v2\)"):
        layout.read(raw, "x.pt")


def _as_v1(state: dict) -> dict:
    """A single-process checkpoint as the code before the components wrote it (one flat dict;
    the world size in the config, the experts' state as the controller's, the usage counts in
    the model buffers)."""
    train, mine = layout.train_module(state), layout.ranks(state)[0]
    controller = {k: v for k, v in layout.expert_state(state).items()
                  if k not in ("usage_counts", "window_counts", "param_steps")}
    return {"format": layout.V1_FORMAT, "step": layout.step(state), "model": train["model"],
            "optimizer": train["optimizer"], "scaler": train["scaler"], "controller": controller,
            "data": mine["data"], "plasticity": {k: v for k, v in mine["plasticity"].items() if k != layout.EXPERTS},
            "trainer": {"step": layout.step(state), "tokens": layout.tokens(state),
                        "elapsed": layout.elapsed(state), "bad_steps": train["bad_steps"],
                        "window": {**mine["metrics"], "counts": torch.stack(layout.expert_state(state)["window_counts"])}},
            "rng": mine["rng"], "config": {**layout.config(state), "world_size": 1}}


def test_a_v1_file_loads_as_the_same_state_regrouped(tmp_path):
    state = _state()
    state["world_size"], state["ranks"] = 1, state["ranks"][:1]
    path = tmp_path / "nemo_ckpt_step5.pt"
    torch.save(_as_v1(state), path)
    loaded = ckpt.load_checkpoint(path)
    assert loaded["format"] == layout.FORMAT
    assert (layout.step(loaded), layout.tokens(loaded), layout.elapsed(loaded)) == (5, 640, 1.5)
    assert layout.world_size(loaded) == 1 and layout.config(loaded) == {"model": {}}
    assert "param_steps" not in layout.expert_state(loaded), "v1 did not count it: the mechanism notes the default"
    assert torch.equal(torch.stack(layout.expert_state(loaded)["window_counts"]), torch.zeros(2, 2, dtype=torch.long))
    assert torch.equal(layout.model_weights(loaded)["w"], torch.ones(2))
    assert layout.train_module(loaded)["bad_steps"] == 0 and layout.optimizer_state(loaded) == {"state": {}}
    assert layout.rank_data(loaded, 0) == {"position": 10} and layout.rank_metrics(loaded, 0) == {"steps": 0}
    assert layout.rank_plasticity(loaded, 0)["heads"] == {"gate": 0}
    assert layout.expert_records(loaded) == layout.expert_records(state)
    assert "usage_counts" not in layout.expert_state(loaded), "single-process v1 kept them in the model buffers"


def test_a_v1_file_of_several_ranks_keeps_each_ranks_part(tmp_path):
    state = _state()
    v1 = _as_v1(state)
    v1["ranks"] = [{"rng": r["rng"], "data": r["data"], "window": r["metrics"],
                    "usage_counts": r["plasticity"][layout.EXPERTS]["usage_counts"],
                    "plasticity": {"heads": r["plasticity"]["heads"]}} for r in layout.ranks(state)]
    loaded = layout.upgrade_v1(v1)
    assert [layout.rank_data(loaded, r) for r in (0, 1)] == [{"position": 10}, {"position": 11}]
    assert torch.equal(layout.expert_state(loaded, 1)["usage_counts"], torch.full((2, 2), 1.0))
    assert layout.expert_state(loaded, 1)["next_id"] == 2 and layout.rank_plasticity(loaded, 1)["heads"] == {"gate": 1}
