"""The colab/ notebooks: each runs top to bottom with small parameters (CI's run of them), and the
committed ones hold outputs made by their current code (`python colab/render.py` remakes them)."""
import re

import nbformat
import pytest

from colab import render

# What CI runs each notebook with; "{tmp}" stands for the test's temporary directory.
SMALL = {
    "quickstart": {"steps": 8, "max_new_tokens": 16, "out": "{tmp}/run"},
    "architecture": {"train_steps": 5, "out": "{tmp}/run"},
    "checkpoints": {"hf_token": "", "max_new_tokens": 8, "out": "{tmp}/ckpt",
                    "plan_rows": [["scout", "tensor=4", "bfloat16", 8192],
                                  ["maverick", "tensor=8", "bfloat16", 8192]]},
    "ablation": {"name": "interleave", "seeds": 1, "out": "{tmp}/runs"},
    "sharding": {"meshes": ["expert=8", "tensor=2,expert=4"],
                 "plan_rows": [["scout", "tensor=8", "bfloat16", 8192],
                               ["maverick", "expert=4,tensor=2", "bfloat16", 8192]]},
}
NOTEBOOKS = sorted(p.stem for p in render.COLAB.glob("*.ipynb"))
MAX_BYTES = 400_000


def read(name):
    return nbformat.read(render.COLAB / f"{name}.ipynb", as_version=4)


def test_every_notebook_runs_in_ci_and_has_a_colab_link():
    assert set(NOTEBOOKS) == set(SMALL)
    readme = (render.ROOT / "README.md").read_text()
    for name in NOTEBOOKS:
        assert re.search(rf"https://colab\.research\.google\.com/github/\S+/blob/main/colab/"
                         rf"{name}\.ipynb", readme), f"README has no Open-in-Colab link to {name}"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_outputs_come_from_the_current_code(name):
    nb = read(name)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), \
        f"{name}: not run top to bottom in one kernel; run python colab/render.py {name}"
    assert nb.metadata.get(render.HASH_KEY) == render.code_hash(nb), \
        f"{name}: code changed since its outputs were made; run python colab/render.py {name}"
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, f"{name}: committed with an error output"
    assert any(o.output_type == "display_data" and "image/png" in o.data
               for c in code for o in c.outputs), f"{name}: no plot among its outputs"
    assert (render.COLAB / f"{name}.ipynb").stat().st_size < MAX_BYTES


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_layout_install_cell_then_parameters(name):
    code = [c for c in read(name).cells if c.cell_type == "code"]
    assert "pip" in code[0].source and "find_spec" in code[0].source, \
        f"{name}: the first cell must install the project where it is missing"
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{name}: needs one cell tagged `parameters` (papermill's)"
    for key in SMALL[name]:
        assert re.search(rf"^{key} = ", tagged[0].source, re.M), f"{name}: no parameter {key}"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_runs_top_to_bottom(name, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", render.kernel_env()["PYTHONPATH"])
    monkeypatch.delenv("HF_TOKEN", raising=False)  # CI downloads nothing
    dst = tmp_path / f"{name}.ipynb"
    params = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v
              for k, v in SMALL[name].items()}
    render.execute(render.COLAB / f"{name}.ipynb", dst, params, timeout=300)  # raises on an error
    code = [c for c in nbformat.read(dst, as_version=4).cells if c.cell_type == "code"]
    assert any("injected-parameters" in c.metadata.get("tags", []) for c in code)
    assert all(c.execution_count is not None for c in code)
