"""notebooks/nemoe_colab.ipynb runs headless (nbclient) on a CPU with a tiny config.

The Colab-only cells (GPU check, Drive, clone, %tensorboard) must skip themselves;
the parameters are overridden papermill-style, in a cell right after the one
tagged `parameters`; the outputs must hold the run's results.
"""

from __future__ import annotations

import math
import time

import pandas as pd
import pytest

from tests.conftest import REPO
from tests.fixtures_data import write_alpaca, write_fineweb
from tests.test_trainer import TINY

NOTEBOOK = REPO / "notebooks" / "nemoe_colab.ipynb"


def notebook_text(nb) -> str:
    """Everything the executed cells showed: streams, plain text and HTML of rich output."""
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                parts.append(out.text)
            elif out.output_type in ("display_data", "execute_result"):
                parts += [str(out.data.get(kind, "")) for kind in ("text/plain", "text/html")]
            elif out.output_type == "error":
                parts.append("ERROR " + out.ename + ": " + out.evalue)
    return "\n".join(parts)


def test_notebook_parameters_cell_and_colab_cells():
    import nbformat
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    for name in ("CONFIG", "RUN_DIR", "RUN_NAME", "MIRROR_DIR", "MAX_STEPS", "SETTINGS", "SAMPLE_TOKENS",
                 "PROJECT_DIR", "REPO_URL"):
        assert f"\n{name} = " in tagged[0].source, name
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    for colab_only in ("drive.mount", '"tensorboard"', "nvidia-smi", "git\", \"clone", "files.download"):
        # each sits under `if ON_COLAB`
        line = next(ln for ln in code.splitlines() if colab_only in ln)
        assert line.startswith((" ", "\t")), colab_only
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "committed without outputs"
    text = "\n".join(c.source for c in nb.cells)
    assert "OWNER" not in text and "REPO_URL = \"\"" in text, "no placeholder to fail on: empty until set"


def test_notebook_with_no_code_source_stops_at_once_with_one_line(tmp_path):
    """Opened outside a checkout (as on Colab) with neither PROJECT_DIR nor REPO_URL set: "Run all"
    stops in the first cell after the parameters, with one line saying what to set."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.read(NOTEBOOK, as_version=4)
    with pytest.raises(CellExecutionError):
        NotebookClient(nb, timeout=120, kernel_name="python3",
                       resources={"metadata": {"path": str(tmp_path)}}).execute()
    ran = [c for c in nb.cells if c.cell_type == "code" and c.get("execution_count")]
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    assert ran[-1] is nb.cells[at + 1], "stopped in the cell right after the parameters"
    (error,) = [out for out in ran[-1].outputs if out.output_type == "error"]
    assert error.ename == "Stop" and error.traceback == [
        "Stop: set PROJECT_DIR (this repository's folder on Drive) or REPO_URL (its git URL) in the parameter "
        "cell, then Run all again"], "one line, no traceback"


@pytest.mark.slow
def test_notebook_runs_headless_and_shows_the_run(tmp_path):
    import nbformat
    from nbclient import NotebookClient

    data = tmp_path / "data"
    data.mkdir()
    write_fineweb(data / "web.parquet", n=300)
    write_alpaca(data / "alpaca.jsonl", n=200)
    sources = (f"[{{name: web, kind: files, path: '{data / 'web.parquet'}', weight: 0.7}}, "
               f"{{name: alpaca, kind: files, path: '{data / 'alpaca.jsonl'}', format: alpaca, weight: 0.3}}]")
    settings = TINY + [f"data.sources={sources}", "data.heldout_fraction=0.1"]
    nb = nbformat.read(NOTEBOOK, as_version=4)
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell(
        f"CONFIG = 'local.yaml'\nRUN_DIR = {str(tmp_path / 'runs')!r}\nRUN_NAME = 'nb'\nMAX_STEPS = 8\n"
        f"MIRROR_DIR = {str(tmp_path / 'mirror')!r}\n"
        f"SETTINGS = {settings!r}\nSAMPLE_TOKENS = 8\nEVAL_BATCHES = 1", metadata={"tags": ["injected-parameters"]}))
    started = time.time()
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    print(f"notebook ran headless in {time.time() - started:.1f} s")
    text = notebook_text(nb)
    assert "ERROR" not in text
    for skipped in ("GPU check skipped", "Drive not mounted", "%tensorboard skipped"):
        assert skipped in text, skipped

    log_dir = tmp_path / "runs" / "logs" / "nb"
    train = pd.read_csv(log_dir / "training_log.csv")
    evals = pd.read_csv(log_dir / "eval.csv")
    assert train["step"].iloc[-1] == 8
    # The summary table and the held-out evaluation show the run's own numbers.
    mixed = evals[(evals["step"] == 8) & (evals["source"] == "all")]["loss"].item()
    assert "held-out loss, last" in text and f"mixed {mixed:.4f}" in text
    assert "8 / 30" in text and f"{train['loss_ce'].iloc[-1]:.4f} last" in text
    assert "held-out loss" in text and "expert usage" in text            # tools/evaluate.py
    assert "The quick brown fox" in text                                 # tools/generate.py
    assert "layer 0" in text and "founders" in text                      # tools/lineage.py's tree
    images = [out for cell in nb.cells for out in cell.get("outputs", []) if "image/png" in out.get("data", {})]
    assert len(images) == 3, "experts, training, lineage"
    assert (log_dir / "report.html").stat().st_size > 10_000
    assert any(p.name.startswith("events.out.tfevents") for p in (log_dir / "tensorboard").iterdir())
    assert math.isfinite(mixed)
    # The mirror (the Colab recipe's copy on Drive) holds the run's checkpoint, sealed by its manifest.
    mirrored = tmp_path / "mirror" / "checkpoints" / "nb"
    assert (mirrored / "nemo_ckpt_step8.pt").is_file() and (mirrored / "nemo_ckpt_step8.pt.json").is_file()
