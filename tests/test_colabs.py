"""The Colab notebooks run top to bottom on the tiny configuration (outputs are
stripped in the repository; a failing cell fails the test)."""
import os

import nbformat
import pytest
from nbclient import NotebookClient

COLABS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "colabs")


def _notebooks():
  return sorted(n for n in os.listdir(COLABS) if n.endswith(".ipynb"))


@pytest.mark.parametrize("name", _notebooks())
def test_notebook_is_stripped_and_runs(name, tmp_path, monkeypatch):
  nb = nbformat.read(os.path.join(COLABS, name), as_version=4)
  assert all(not c.get("outputs") and not c.get("execution_count")
             for c in nb.cells if c.cell_type == "code"), "commit notebooks without outputs"
  monkeypatch.setenv("G2FACE_COLAB_CONFIG", "tiny")
  monkeypatch.setenv("G2FACE_COLAB_STEPS", "2")
  NotebookClient(nb, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": str(tmp_path)}}).execute()
