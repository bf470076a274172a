"""experiments/notebooks/migu_minilm.ipynb: stored without outputs, and it runs (nbclient, this interpreter's
python3 kernel) at a small setting, producing the figures and numbers it promises."""

import json
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "experiments" / "notebooks" / "migu_minilm.ipynb"

nbformat = pytest.importorskip("nbformat")


def test_notebook_is_stored_without_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert all(not c.outputs and c.execution_count is None for c in code), "clear the notebook's outputs"
  assert sum("parameters" in c.metadata.get("tags", []) for c in code) == 1


@pytest.mark.heavy
def test_notebook_runs_at_a_small_setting(tiny_models, tmp_path):
  # The tiny BERT (tests/tiny_cl.py) stands in for MiniLM: the notebook's code is the same for any model (the
  # MiniLM preset itself is tested in tests/test_models_bert.py and runs in the main job).
  from nbclient import NotebookClient

  nb = nbformat.read(NOTEBOOK, as_version=4)
  at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
  out = tmp_path / "out"
  nb.cells.insert(at + 1, nbformat.v4.new_code_cell(
      f"MODEL = {tiny_models['bert']!r}\n"
      f"TRAIN_PER_CLASS, MAX_TEST, MAX_LENGTH, BATCH_SIZE, MAGNITUDE_BATCHES = 2, 8, 32, 8, 1\n"
      f"LAYER, SHOW_FEATURES = 'layers_1/intermediate/kernel', 16\nOUTPUT_DIR = {str(out)!r}"))
  NotebookClient(nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(tmp_path)}}).execute()

  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  assert len(images) == 2  # Figure 1 and the accuracy heatmaps
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  assert "| seqft |" in text and "| migu |" in text and "mean overlap" in text
  summary = json.loads(text.split("SUMMARY ", 1)[1].splitlines()[0])
  assert summary == json.loads((out / "notebook_summary.json").read_text())
  assert summary["tasks"] == ["agnews", "sst-2"]
  assert 0.0 < summary["mean_top_overlap"] <= 1.0 and summary["chance_overlap"] == pytest.approx(0.3 / 1.7)
  for method in ("seqft", "migu"):
    matrix = summary["matrices"][method]
    assert len(matrix) == 2 and all(len(row) == 2 and all(0 <= a <= 1 for a in row) for row in matrix)
    assert summary["forgetting_first_task"][method] == pytest.approx(matrix[0][0] - matrix[1][0])
  assert summary["matrices"]["seqft"][0] == summary["matrices"]["migu"][0]  # task 1 is trained unmasked
  for name in ("figure1_magnitudes.png", "accuracy_matrices.png", "results.json"):
    assert (out / name).stat().st_size > 1000, name
