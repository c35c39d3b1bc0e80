"""notebooks/sampling.ipynb runs top to bottom on a tiny checkpoint (nbclient, this interpreter)."""

import json
import sys

import nbformat
import pytest
from conftest import ROOT
from nbclient import NotebookClient

pytestmark = pytest.mark.slow

NOTEBOOK = ROOT / "notebooks" / "sampling.ipynb"


def _stdout(cell) -> str:
    return "".join(o.text for o in cell.outputs if o.output_type == "stream" and o.name == "stdout")


def _cell(nb, marker: str):
    (cell,) = [c for c in nb.cells if c.cell_type == "code" and marker in c.source]
    return cell


def test_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]


def test_notebook_runs_on_a_tiny_checkpoint(tiny_run, tmp_path, monkeypatch):
    workdir, _ = tiny_run
    # A kernel of this interpreter, that imports dsv3_jax from this checkout and loads the run.
    spec = tmp_path / "kernels" / "dsv3-test"
    spec.mkdir(parents=True)
    kernel = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "dsv3_jax test",
        "language": "python",
        "env": {
            "DSV3_NOTEBOOK_CHECKPOINT": str(workdir),
            "PYTHONPATH": str(ROOT),
            "JAX_PLATFORMS": "cpu",
            "MPLBACKEND": "module://matplotlib_inline.backend_inline",
        },
    }
    (spec / "kernel.json").write_text(json.dumps(kernel))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        nb,
        kernel_name="dsv3-test",
        timeout=300,  # per cell; the first generate compiles
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    client.execute()  # raises CellExecutionError, with the traceback, if a cell fails

    assert "step 8:" in _stdout(_cell(nb, "load_checkpoint(CHECKPOINT)"))
    batch = _stdout(_cell(nb, "sampled = generate("))
    assert batch.count("--- greedy\n") == 3 and batch.count("--- sampled") == 3
    first_greedy = batch.split("--- greedy\n")[1].split("\n--- sampled")[0]
    streamed = _stdout(_cell(nb, "callback=streamer"))
    assert streamed == first_greedy and len(streamed) > len("ROMEO:")
    spec_out = _stdout(_cell(nb, "speculative_mtp=True"))
    assert "same tokens as plain greedy: True" in spec_out and "acceptance rate" in spec_out
    heatmap = _cell(nb, "expert_choices")
    assert any("image/png" in o.get("data", {}) for o in heatmap.outputs)
    loads = [line for line in _stdout(heatmap).splitlines() if "tokens per expert" in line]
    assert [line.split(":")[0] for line in loads] == ["layer 1", "layer 2"]
    totals = {sum(json.loads(line.split("expert ")[1])) for line in loads}
    assert len(totals) == 1 and totals.pop() % 2 == 0  # k = 2 experts per token, every layer
