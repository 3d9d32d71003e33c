#!/usr/bin/env python
"""Write README.md from nbs/index.ipynb without Quarto (where Quarto exists, `nbdev_docs` does the same job).

Markdown cells are copied verbatim; visible code cells become ```python blocks; `#| hide` cells are left out.
Usage: python .ci/readme.py [--check]   (--check exits 1 if README.md is out of date)
"""
import sys
from pathlib import Path
import nbformat

root = Path(__file__).resolve().parent.parent

def render(nb_path=root/'nbs'/'index.ipynb') -> str:
    nb = nbformat.read(nb_path, as_version=4)
    parts = ["<!-- generated from nbs/index.ipynb: edit the notebook, then run `python .ci/readme.py` -->"]
    for c in nb.cells:
        src = c.source.strip()
        if not src: continue
        if c.cell_type == 'markdown': parts.append(src)
        elif c.cell_type == 'code' and not src.startswith('#| hide'):
            parts.append("```python\n" + "\n".join(l for l in src.splitlines() if not l.startswith('#|')) + "\n```")
    return "\n\n".join(parts) + "\n"

if __name__ == '__main__':
    text, readme = render(), root/'README.md'
    if '--check' in sys.argv:
        ok = readme.exists() and readme.read_text() == text
        print("README.md is up to date" if ok else "README.md is out of date: run `python .ci/readme.py`")
        sys.exit(0 if ok else 1)
    readme.write_text(text); print(f"wrote {readme}")
