"""The study regime's data: byte-level tokens, documents in a seeded order, held-out sets from
many documents -- and the places a run turns text into ids and back (training, evaluation,
generate, evaluate, export) honouring the tokenizer a run was trained with."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from nemoe.config import config_from_dict, load_config
from nemoe.data import DataConfig, SourceConfig, TokenStream, source_documents
from nemoe.errors import UserError
from nemoe.flops import flops_per_token, flops_split
from nemoe.rundir import incompatibility
from nemoe.heldout import heldout_sets
from nemoe.tokenizer import get_tokenizer
from tests.test_tools import assert_one_error, run_script
from tests.test_trainer import run
from tools.comparison.results import meta_model

BYTES = get_tokenizer("bytes")


# --------------------------------------------------------------------------- #
# Byte tokens
# --------------------------------------------------------------------------- #

@pytest.mark.parametrize("text", ["", "plain ascii", "naïve café – ünïcode ✓ 𝄞", "a\nb\tc <|endoftext|>"])
def test_bytes_round_trip_and_special_text_is_plain(text):
    ids = BYTES.encode(text)
    assert ids == list(text.encode("utf-8")) and all(0 <= i < 256 for i in ids)
    assert BYTES.decode(ids) == text
    assert BYTES.decode(torch.tensor(ids + [BYTES.eot_id])) == text  # end-of-text has no text


def test_bytes_vocabulary_and_padding_ids():
    assert (BYTES.n_vocab, BYTES.eot_id) == (257, 256)
    assert BYTES.decode([104, 105, 300, 256, 33]) == "hi!"  # padding rows of a 320-row head: no text
    assert BYTES.decode([0xE2, 0x82]) == "\ufffd"            # a cut multi-byte character


def test_bytes_config_needs_a_small_vocabulary():
    with pytest.raises(UserError, match="model.vocab_size between 257 and 1024"):
        config_from_dict({"data": {"tokenizer": "bytes"}})
    assert config_from_dict({"data": {"tokenizer": "bytes"}, "model": {"vocab_size": 320}}).data.tokenizer == "bytes"


def test_resuming_with_another_tokenizer_is_refused_even_when_changes_are_allowed():
    saved = config_from_dict({}).to_dict()
    now = config_from_dict({"data": {"tokenizer": "bytes"}, "model": {"vocab_size": 320}}).to_dict()
    for allowed in (False, True):
        why = incompatibility({"world_size": 1, "config": saved}, now, 1, allowed)
        assert why is not None and "data.tokenizer gpt2" in why and "--set data.tokenizer=gpt2" in why
    del saved["data"]["tokenizer"]  # a checkpoint written before the setting existed was GPT-2
    assert "data.tokenizer gpt2" in incompatibility({"world_size": 1, "config": saved}, now, 1, True)


def test_flops_split_adds_up_and_bytes_study_spends_on_experts():
    shares = {}
    for name in ("study.yaml", "study_bytes.yaml"):
        cfg = load_config(name)
        model, live = meta_model(cfg), [cfg.moe.experts_init] * cfg.model.n_layers
        parts = flops_split(model, cfg.model.seq_len, live)
        assert sum(parts.values()) == pytest.approx(flops_per_token(model, cfg.model.seq_len, live))
        shares[name] = {k: v / sum(parts.values()) for k, v in parts.items()}
    assert shares["study.yaml"]["lm_head"] > 0.8          # the regime without headroom
    assert shares["study_bytes.yaml"]["experts"] >= 0.3   # the study's requirement


# --------------------------------------------------------------------------- #
# Documents in a seeded order
# --------------------------------------------------------------------------- #

@pytest.fixture
def numbered(tmp_path):
    """A local jsonl source of 200 numbered documents."""
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"document {i:03d} " + "x" * (i % 7)}) + "\n" for i in range(200)))
    return str(path)


def config(path, seed, shuffle=True, **kw) -> DataConfig:
    return DataConfig(sources=[SourceConfig(name="docs", kind="files", path=path)], shuffle=shuffle, seed=seed,
                      heldout_fraction=0.2, **kw)


def documents(cfg, part):
    return [d["text"] for d in source_documents(cfg.sources[0], cfg, part)]


def test_shuffled_order_is_a_permutation_that_depends_on_the_seed(numbered):
    plain = documents(config(numbered, 0, shuffle=False), "train")
    orders = [documents(config(numbered, seed), "train") for seed in (0, 1, 0)]
    assert sorted(orders[0]) == sorted(plain) and len(plain) > 100   # the same documents ...
    assert orders[0] != plain and orders[0] != orders[1]             # ... in a seed's own order
    assert orders[0] == orders[2]                                    # reproducible


def test_heldout_set_is_the_same_for_every_seed_and_never_trained_on(numbered):
    held = [documents(config(numbered, seed), "heldout") for seed in (0, 1)]
    assert held[0] == held[1] and len(held[0]) >= 20
    assert not set(held[0]) & set(documents(config(numbered, 0), "train"))
    assert sorted(held[0]) == sorted(documents(config(numbered, 0, shuffle=False), "heldout"))


def test_shuffled_stream_resumes_exactly(numbered):
    cfg = config(numbered, 3, on_exhausted="cycle")
    stream = TokenStream(cfg, BYTES, seq_len=31)
    for _ in range(5):
        stream.next_batch(4)
    state = json.loads(json.dumps(stream.state_dict()))  # what a checkpoint keeps: plain data
    expected = [stream.next_batch(4) for _ in range(20)]  # past the end of the source: it cycles
    stream.close()
    again = TokenStream(cfg, BYTES, seq_len=31)
    again.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(expected, [again.next_batch(4) for _ in range(20)]))
    again.close()


def rows(batches) -> list[tuple]:
    return sorted(tuple(r) for b in batches for r in b.tolist())


def test_mixed_blocks_are_each_window_permuted_once_and_resume_exactly(numbered):
    plain = TokenStream(config(numbered, 3), BYTES, seq_len=15)
    in_order = [plain.next_batch(4) for _ in range(6)]                  # 24 blocks: two windows of 12
    plain.close()
    cfg = config(numbered, 3, mix_blocks=12)
    stream = TokenStream(cfg, BYTES, seq_len=15)
    mixed = [stream.next_batch(4), stream.next_batch(4)]
    state = json.loads(json.dumps(stream.state_dict()))
    assert state["mix"] == {"blocks": 12, "window": 0, "served": 8}
    mixed += [stream.next_batch(5) for _ in range(2)] + [stream.next_batch(3) for _ in range(2)]  # across windows
    stream.close()
    assert rows(in_order[:3]) == rows([torch.cat(mixed)[:12]])  # window 0 holds its own blocks, permuted
    assert rows(in_order) == rows(mixed) and not torch.equal(torch.cat(in_order), torch.cat(mixed))
    again = TokenStream(cfg, BYTES, seq_len=15)
    again.load_state_dict(state)
    assert torch.equal(torch.cat(mixed[2:]), torch.cat([again.next_batch(5) for _ in range(2)]
                                                       + [again.next_batch(3) for _ in range(2)]))
    again.close()
    other = TokenStream(config(numbered, 4, mix_blocks=12), BYTES, seq_len=15)
    assert not torch.equal(other.next_batch(12), torch.cat(mixed)[:12])  # another seed, another order
    other.close()


def test_resuming_with_another_mix_window_is_refused(numbered):
    stream = TokenStream(config(numbered, 3, mix_blocks=12), BYTES, seq_len=15)
    stream.next_batch(4)
    state = stream.state_dict()
    stream.close()
    with pytest.raises(UserError, match="data.mix_blocks 12"):
        TokenStream(config(numbered, 3, mix_blocks=8), BYTES, seq_len=15).load_state_dict(state)


def test_heldout_cap_spreads_evaluation_over_many_documents(numbered):
    whole = heldout_sets(config(numbered, 0), BYTES, seq_len=15, n_batches=2, batch_size=4)["docs"]
    capped = heldout_sets(config(numbered, 0, heldout_doc_tokens=4), BYTES, seq_len=15, n_batches=2,
                          batch_size=4)["docs"]
    assert whole.tokens == capped.tokens == 2 * 4 * 16
    assert capped.documents == 2 * 4 * 16 // 4 > whole.documents
    text = BYTES.decode(torch.cat(capped.batches).flatten())
    assert text.startswith("docu") and "document" not in text  # 4 bytes of each document, no more


def test_unshuffled_is_corpus_order_and_shuffle_refuses_streamed_sources(numbered):
    assert documents(config(numbered, 5, shuffle=False), "train")[0].startswith("document 000")
    problems = DataConfig(sources=[SourceConfig(name="web", kind="hf", path="HuggingFaceFW/fineweb"),
                                   SourceConfig(name="url", kind="files", path="http://127.0.0.1:9/a.jsonl")],
                          shuffle=True).check()
    assert sum("data.shuffle" in p for p in problems) == 2


def test_study_bytes_heldout_sets_are_many_documents_and_seed_independent():
    sizes = []
    for seed in (0, 1):
        cfg = load_config("study_bytes.yaml", [f"train.seed={seed}"])
        held = heldout_sets(cfg.data, BYTES, cfg.model.seq_len, cfg.eval.batches, cfg.eval.batch_size)
        sizes.append({name: (h.documents, h.tokens, torch.cat(h.batches).sum().item()) for name, h in held.items()})
    assert sizes[0] == sizes[1]
    assert all(docs >= 64 and tokens == cfg.eval.batches * cfg.eval.batch_size * (cfg.model.seq_len + 1)
               for docs, tokens, _ in sizes[0].values())


# --------------------------------------------------------------------------- #
# A byte-level run end to end
# --------------------------------------------------------------------------- #

BYTE_RUN = ["data.tokenizer=bytes", "model.vocab_size=264", "data.shuffle=true",
                   "data.heldout_doc_tokens=8", "data.heldout_fraction=0.05", "log.sample_every_steps=6"]


@pytest.mark.slow
def test_byte_run_resumes_exactly_and_tools_use_its_tokenizer(tmp_path):
    assert run(tmp_path / "straight", *[a for s in BYTE_RUN for a in ("--set", s)], "--max-steps", "10") == 0
    cut = tmp_path / "cut"
    assert run(cut, *[a for s in BYTE_RUN for a in ("--set", s)], "--max-steps", "5") == 0
    assert run(cut, *[a for s in BYTE_RUN for a in ("--set", s)], "--max-steps", "10", "--resume") == 0
    logs = [pd.read_csv(d / "logs" / "tiny" / "training_log.csv") for d in (tmp_path / "straight", cut)]
    assert logs[0]["loss_ce"].tolist() == logs[1]["loss_ce"].tolist() and len(logs[0]) == 10
    text = (cut / "logs" / "tiny" / "training_log.txt").read_text()
    assert "held-out evaluation: prose" in text and "Sample |" in text

    # another tokenizer on resume: one message, exit 2, the run's files untouched
    before = sorted(p.name for p in (cut / "checkpoints" / "tiny").iterdir())
    assert run(cut, "--max-steps", "12", "--resume") == 2
    assert sorted(p.name for p in (cut / "checkpoints" / "tiny").iterdir()) == before

    checkpoint = cut / "checkpoints" / "tiny" / "nemo_ckpt_step10.pt"
    generated = run_script("generate", checkpoint, "--prompt", "def ", "--max-new-tokens", "12", "--json")
    assert generated.returncode == 0, generated.stderr
    out = json.loads(generated.stdout)
    assert out["prompt_tokens"] == list(b"def ") and all(0 <= t < 264 for t in out["tokens"][0])
    evaluated = run_script("evaluate", checkpoint, "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    assert set(json.loads(evaluated.stdout)["sources"]) >= {"prose", "code"}
    exported = run_script("export_hf", checkpoint, "-o", tmp_path / "hf", "--format", "gpt2")
    assert_one_error(exported.returncode, exported.stderr, "only GPT-2-tokenized models export")


def test_pieces_cut_at_line_ends_and_join_back():
    from nemoe.documents import pieces
    text = "short\n" + "x" * 25 + "\nend\n"
    cut = pieces(text, 10)
    assert "".join(cut) == text and all(0 < len(p) <= 10 for p in cut)
    assert cut == ["short\n", "x" * 10, "x" * 10, "xxxxx\nend\n"]   # whole lines where they fit
    assert pieces("", 10) == [] and pieces("abc", 10) == ["abc"]


def test_max_doc_chars_cuts_the_largest_builtin_documents_only_when_asked():
    from nemoe.builtin_corpus import builtin_corpus
    whole, cut = builtin_corpus("code")["text"], builtin_corpus("code", 8192)["text"]
    assert max(map(len, whole)) > 500_000 and max(map(len, cut)) <= 8192
    assert len(cut) > len(whole) and abs(sum(map(len, cut)) - sum(map(len, whole))) < 100
    cfg = DataConfig(sources=[SourceConfig(name="code", kind="builtin", path="code")], max_doc_chars=8192)
    first = next(iter(source_documents(cfg.sources[0], cfg, "train")))["text"]
    assert len(first) <= 8192 and whole[0].startswith(first)


def test_bench_flops_prints_each_configs_split(capsys):
    from tools import bench
    assert bench.main(["--flops", "study.yaml,study_bytes.yaml"]) == 0
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in capsys.readouterr().out.splitlines()}
    assert rows["study"][3] == "86.6%" and rows["study_bytes"][1] == "bytes"
    assert float(rows["study_bytes"][5].rstrip("%")) >= 30   # experts' share of the training FLOPs
