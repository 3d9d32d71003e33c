"""Every tutorial runs top to bottom under plain Jupyter (nbclient, the engine of `jupyter nbconvert --execute` and of
JupyterLab's Run All), in a CPU-only kernel started in the notebook's own folder, as a newcomer would run it.

`nbdev_test` is not enough: it honours nbdev's `#| eval: false` / `#| slow` markers, which Jupyter ignores. While a
tutorial runs, every matplotlib figure it shows is checked for readability (`FIGURE_LINT`, injected into the kernel,
never saved into the notebook): dpi >= 100, no title overlapping another title or another panel's labels, no image
panel mostly clipped by its colour limits, no bar panel whose bars are all zero."""
import json, os, time
from pathlib import Path
import nbformat, pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
from ullsam_nb.basics import shared_data_dir

ROOT = Path(__file__).resolve().parent.parent
TUTORIALS = sorted((ROOT/"nbs"/"tutorials").glob("*.ipynb"))
MARK = "@@FIGURE_LINT@@"
MAX_SECONDS = float(os.environ.get("ULLSAM_TUTORIAL_MAX_S", 600))   # a generous ceiling; the aim is ~90 s each on a laptop CPU

FIGURE_LINT = r'''
import json as _json, matplotlib as _mpl, numpy as _np
from matplotlib.backend_bases import FigureCanvasBase as _Canvas
from matplotlib.container import BarContainer as _Bars
from matplotlib.image import AxesImage as _AxesImage
_LINT = {"figures": 0, "problems": [], "cell": ""}

def _lint_cell(info): _LINT["cell"] = (info.raw_cell.strip().splitlines() or [""])[0][:70]
get_ipython().events.register("pre_run_cell", _lint_cell)

def _overlap(a, b, pad=1.0):
    return min(a.x1, b.x1) - max(a.x0, b.x0) > pad and min(a.y1, b.y1) - max(a.y0, b.y0) > pad

def _figure_problems(fig, dpi):
    out = []
    if dpi < 100: out.append(f"dpi {dpi:g} < 100")
    fig.draw_without_rendering()                                   # applies tight/constrained layout as the print will
    r = fig.canvas.get_renderer() if hasattr(fig.canvas, "get_renderer") else fig._get_renderer()   # figures closed to pyplot
    axes = [a for a in fig.axes if a.get_visible()]
    titles = [(i, t) for i, a in enumerate(axes) for t in (a.title, a._left_title, a._right_title) if t.get_text().strip()]
    if fig._suptitle is not None and fig._suptitle.get_text().strip(): titles.append((-1, fig._suptitle))
    boxes = [(i, t, t.get_window_extent(r)) for i, t in titles]
    for k, (i, t, b) in enumerate(boxes):
        for j, u, c in boxes[k + 1:]:
            if _overlap(b, c): out.append(f"titles overlap: {t.get_text()!r} / {u.get_text()!r}")
        for j, a in enumerate(axes):
            if j == i or not a.axison: continue
            others = [a.xaxis.label, a.yaxis.label] + [l for l in a.get_xticklabels() + a.get_yticklabels() if l.get_visible()]
            if any(o.get_text().strip() and _overlap(b, o.get_window_extent(r)) for o in others):
                out.append(f"title {t.get_text()!r} overlaps another panel's labels")
    for a in axes:
        name = a.get_title() or "untitled panel"
        for im in a.get_images():
            arr = _np.ma.masked_invalid(_np.asarray(im.get_array(), float))
            if arr.ndim != 2 or arr.count() == 0: continue
            lo, hi = im.norm.vmin, im.norm.vmax
            if lo is None or hi is None or lo >= hi: continue
            clipped = float(((arr < lo) | (arr > hi)).sum()) / arr.count()
            if clipped > 0.25: out.append(f"{name!r}: {clipped:.0%} of the image is clipped by its colour limits [{lo:g}, {hi:g}]")
        bars = [p for c in a.containers if isinstance(c, _Bars) for p in c]
        if bars and all(abs(p.get_height()) < 1e-12 and abs(p.get_width()) > 0 or abs(p.get_width()) < 1e-12 for p in bars):
            out.append(f"{name!r}: every bar is zero (a blank panel)")
    return out

_print_figure = _Canvas.print_figure
def _linted_print_figure(self, *args, **kw):
    fig, dpi = self.figure, kw.get("dpi")
    dpi = float(dpi) if isinstance(dpi, (int, float)) else float(fig.dpi)
    if isinstance(args[0] if args else None, str) or kw.get("format", "png") in ("png", "jpg", "jpeg", "svg", "pdf"):
        _LINT["figures"] += 1
        try: probs = _figure_problems(fig, dpi)
        except Exception as e: probs = [f"figure check failed: {e!r}"]
        _LINT["problems"] += [f"[{_LINT['cell']}] {p}" for p in probs]
    return _print_figure(self, *args, **kw)
_Canvas.print_figure = _linted_print_figure
'''

def _kernel_env():
    "The newcomer's kernel: no GPU visible, caches in a throwaway folder, real data where this workspace has it."
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "MPLBACKEND"))}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "2"), PYDEVD_DISABLE_FILE_VALIDATION="1")
    d = shared_data_dir()
    if d is not None: env["ULLSAM_SHARED_DATA"] = str(d)
    return env

def execute_tutorial(path:Path, timeout:int=900) -> tuple:
    "Run notebook `path` with nbclient in its own folder; returns (executed notebook, figure lint dict, seconds)."
    nb = nbformat.read(path, as_version=4)
    nb.cells.insert(0, nbformat.v4.new_code_cell(FIGURE_LINT))
    nb.cells.append(nbformat.v4.new_code_cell(f"print({MARK!r}, _json.dumps({{k: _LINT[k] for k in ('figures', 'problems')}}))"))
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}})
    t0 = time.perf_counter()
    client.execute(env=_kernel_env())
    seconds = time.perf_counter() - t0
    text = "".join(o.get("text", "") for o in nb.cells[-1].outputs)
    lint = json.loads(text.split(MARK, 1)[1])
    return nb, lint, seconds

def test_tutorials_exist_and_have_no_nbdev_only_skips():
    "`#| eval: false` is invisible to Jupyter: GPU-only cells must be guarded in code instead."
    assert len(TUTORIALS) >= 9
    for p in TUTORIALS:
        for i, c in enumerate(nbformat.read(p, as_version=4).cells):
            if c.cell_type != "code": continue
            flags = [l.replace(" ", "") for l in c.source.splitlines() if l.startswith("#|")]
            assert "#|eval:false" not in flags, f"{p.name} cell {i}: `#| eval: false` is ignored by Jupyter; guard the cell in code"

@pytest.mark.parametrize("path", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_runs_in_plain_jupyter(path, capsys):
    before = sorted(p.name for p in path.parent.iterdir())
    try: nb, lint, seconds = execute_tutorial(path)
    except CellExecutionError as e: pytest.fail(f"{path.name} stops under plain Jupyter:\n{str(e)[-3000:]}")
    with capsys.disabled(): print(f"\n{path.name}: {seconds:.1f} s under plain Jupyter (CPU kernel), {lint['figures']} figures checked")
    assert sorted(p.name for p in path.parent.iterdir()) == before, f"{path.name} left files in {path.parent}"
    assert not lint["problems"], f"{path.name}: unreadable figures:\n" + "\n".join(lint["problems"])
    assert seconds < MAX_SECONDS, f"{path.name} took {seconds:.0f} s"

def test_figure_lint_catches_what_it_should(tmp_path):
    "The lint itself, on a notebook with each kind of bad figure (and one good one)."
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(s) for s in [
        "import numpy as np, matplotlib.pyplot as plt",
        "fig, ax = plt.subplots(dpi=60); ax.plot([1, 2])",
        "fig, axes = plt.subplots(1, 2, figsize=(3, 2), dpi=100)\n"
        "for a in axes: a.set_title('a rather long panel title here')",
        "fig, ax = plt.subplots(dpi=100); ax.imshow(np.full((8, 8), 2.0), vmin=-0.3, vmax=0.3); ax.set_title('flat')",
        "fig, ax = plt.subplots(dpi=100); ax.bar([0, 1], [0, 0]); ax.set_title('zeros')",
        "fig, axes = plt.subplots(1, 2, figsize=(8, 3), dpi=100)\n"
        "axes[0].imshow(np.random.rand(8, 8)); axes[0].set_title('fine'); axes[1].bar([0, 1], [0, 1]); axes[1].set_title('bars')",
    ]]
    path = tmp_path/"bad_figures.ipynb"
    nbformat.write(nb, path)
    _, lint, _ = execute_tutorial(path)
    probs = "\n".join(lint["problems"])
    assert lint["figures"] == 5, lint
    assert "dpi 60 < 100" in probs and "titles overlap" in probs
    assert "100% of the image is clipped" in probs and "every bar is zero" in probs
    assert "fine" not in probs and "'bars'" not in probs, probs

def save_outputs(path:Path, timeout:int=1800) -> float:
    "Run tutorial `path` as the test does and save it with its fresh outputs (no lint cells); returns the seconds it took."
    nb = nbformat.read(path, as_version=4)
    t0 = time.perf_counter()
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute(env=_kernel_env())
    for c in nb.cells: c.metadata.pop("execution", None)
    nbformat.write(nb, path)
    return time.perf_counter() - t0

if __name__ == "__main__":
    # Refresh the outputs saved in the tutorials (what the docs site shows), e.g. after the default model changes:
    #   python tests/test_tutorials.py nbs/tutorials/*.ipynb && nbdev_clean
    import sys, tempfile
    os.environ.setdefault("ULLSAM_CACHE_DIR", tempfile.mkdtemp())
    for p in map(Path, sys.argv[1:]): print(f"{p.name}: {save_outputs(p.resolve()):.0f} s")
