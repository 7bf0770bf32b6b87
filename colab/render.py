"""Execute the notebooks in place with their default parameters: the outputs that are committed.

    python colab/render.py [NAME ...]      # NAME: quickstart, checkpoints, ... (default: all)

Each notebook runs top to bottom in a new kernel, in a new empty working directory (what it
writes is deleted after), with the repository root first on PYTHONPATH so that it imports this
checkout. Its PNG outputs are then re-encoded with a small palette, and the hash of its code
cells is stored in its metadata: the tests fail when a committed notebook's code is not the code
its outputs came from.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import io
import os
import tempfile
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
COLAB = ROOT / "colab"
HASH_KEY = "outputs_from_code_sha256"
MAX_PNG_WIDTH = 900


def code_hash(nb) -> str:
    """sha256 of the code cells' sources, in order (markdown does not change outputs)."""
    h = hashlib.sha256()
    for cell in nb.cells:
        if cell.cell_type == "code":
            h.update(cell.source.encode() + b"\0")
    return h.hexdigest()


def kernel_env() -> dict:
    """The environment of the notebook's kernel: this checkout first on the import path."""
    path = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": str(ROOT) + (os.pathsep + path if path else "")}


def execute(src: Path, dst: Path, parameters: dict | None = None, timeout: int = 1800,
            cwd: Path = ROOT):
    """Run `src` top to bottom into `dst` (papermill: `parameters` go in after the cell tagged
    `parameters`); raises on the first cell that fails. The kernel inherits this process's
    environment: set `kernel_env()` first."""
    import papermill
    papermill.execute_notebook(str(src), str(dst), parameters=parameters or {}, cwd=str(cwd),
                               kernel_name="python3", progress_bar=False,
                               execution_timeout=timeout)


def shrink_png(data: str) -> str:
    """A base64 PNG re-encoded with an adaptive palette, at most MAX_PNG_WIDTH wide."""
    from PIL import Image
    img = Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")
    if img.width > MAX_PNG_WIDTH:
        img = img.resize((MAX_PNG_WIDTH, round(img.height * MAX_PNG_WIDTH / img.width)),
                         Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.quantize(colors=64).save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode()


def tidy(nb):
    """Drop papermill's and nbclient's run records (timings) and shrink the PNGs; stamp the hash."""
    nb.metadata.pop("papermill", None)
    for cell in nb.cells:
        for key in ("papermill", "execution"):
            cell.metadata.pop(key, None)
        for out in cell.get("outputs", []):
            if "image/png" in out.get("data", {}):
                out["data"]["image/png"] = shrink_png(out["data"]["image/png"])
    nb.metadata[HASH_KEY] = code_hash(nb)
    return nb


def render(name: str):
    path = COLAB / f"{name}.ipynb"
    with tempfile.TemporaryDirectory() as tmp:  # also the kernel's cwd: a fresh start
        executed = Path(tmp) / path.name
        execute(path, executed, cwd=Path(tmp))
        nbformat.write(tidy(nbformat.read(executed, as_version=4)), path)


def main(argv=None):
    known = sorted(p.stem for p in COLAB.glob("*.ipynb"))
    ap = argparse.ArgumentParser(prog="python colab/render.py", description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", metavar="NAME",
                    help=f"notebooks to render: {', '.join(known)} (default: all)")
    names = ap.parse_args(argv).names or known
    unknown = sorted(set(names) - set(known))
    if unknown:
        ap.error(f"no notebook {', '.join(unknown)} in colab/ (there are {', '.join(known)})")
    os.environ.update(kernel_env())
    for name in names:
        print(f"rendering colab/{name}.ipynb", flush=True)
        render(name)


if __name__ == "__main__":
    main()
