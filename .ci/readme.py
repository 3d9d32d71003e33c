#!/usr/bin/env python
"""Write README.md from nbs/index.ipynb without Quarto (where Quarto exists, `nbdev_docs` does the same job).

Markdown cells are copied verbatim, except relative links, which are rewritten to work from the repository root
(`tutorials/x.ipynb` in nbs/index.ipynb becomes `nbs/tutorials/x.ipynb`); visible code cells become ```python blocks;
`#| hide` cells are left out.
Usage: python .ci/readme.py [--check]   (--check exits 1 if README.md is out of date)
"""
import re, sys
from pathlib import Path
import nbformat

root = Path(__file__).resolve().parent.parent

def root_links(md:str, base=root/'nbs') -> str:
    "Rewrite markdown links relative to `base` (where index.ipynb lives) so they resolve from the repository root."
    def fix(m):
        target = m[2]
        if re.match(r"[a-z]+:|#|/", target): return m[0]
        path = target.split("#")[0]
        if not (root/path).exists() and (base/path).exists():
            target = (base/target).relative_to(root).as_posix() if "#" not in target else (base/path).relative_to(root).as_posix() + "#" + target.split("#", 1)[1]
        return f"{m[1]}({target})"
    return re.sub(r"(\[[^\]]*\])\(([^)\s]+)\)", fix, md)

def render(nb_path=root/'nbs'/'index.ipynb') -> str:
    nb = nbformat.read(nb_path, as_version=4)
    parts = ["<!-- generated from nbs/index.ipynb: edit the notebook, then run `python .ci/readme.py` -->"]
    for c in nb.cells:
        src = c.source.strip()
        if not src: continue
        if c.cell_type == 'markdown': parts.append(root_links(src))
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
