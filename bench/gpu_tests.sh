#!/usr/bin/env bash
# GPU checks and the SAM-encoder benchmark, for a lent GPU machine (H100/H200; no network there).
#
# 1. Here (the dev machine, once):   bash bench/gpu_tests.sh --prepare
#    copies the pure-Python packages that the GPU image lacks (segment-anything, nbdev and its dependencies:
#    fastcore, execnb, ghapi, IPython, ...) from this .venv into .whl/site/ (ignored by git, carried to the device
#    as /work/.library/device/README.md explains; any real wheels put in .whl/*.whl are installed there too).
# 2. On the device (tool `run`, carry [".whl"]):   bash bench/gpu_tests.sh [extra bench/sam_encoder.py options]
#    a) nbdev_test --flags cuda on the encoder notebook (NB=... to test other notebooks too);
#    b) python bench/sam_encoder.py: vit_b at 1024^2, batch 1 and 8, fp32/bf16, fwd and fwd+bwd, all variants;
#       table to stdout, JSON (and the log) to $OUT when set, else bench/results/.
#    The default run (40 cases, torch.compile of the `compiled` variant 4 times) may need most of one 10-minute call;
#    if it does not fit, split it:  ... gpu_tests.sh --precision bf16   then   NB=none ... --precision fp32
#    (NB=none skips the notebook). Useful extras: --compile-mode max-autotune, --models vit_b,vit_l,vit_h --batch 8.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare" ]; then
  . .venv/bin/activate
  python - <<'EOF'
import importlib.metadata as md, shutil, pathlib, re
need = ["segment-anything", "nbdev", "fastcore", "execnb", "ghapi", "fastgit", "astunparse", "watchdog", "ipython",
        "ipython-pygments-lexers", "traitlets", "stack-data", "pure-eval", "asttokens", "executing", "prompt-toolkit",
        "wcwidth", "pexpect", "ptyprocess", "matplotlib-inline"]      # not jedi (33 MB; IPython runs without it)
out = pathlib.Path(".whl/site"); shutil.rmtree(out, ignore_errors=True); out.mkdir(parents=True)
for name in need:
    d = md.distribution(name)
    tops = {pathlib.Path(str(f)).parts[0] for f in d.files if not str(f).startswith("..")}
    for t in tops:
        src = pathlib.Path(d.locate_file(t))
        if t == "__pycache__" or t.endswith(".pth") or not src.exists(): continue
        (shutil.copytree(src, out/t, ignore=shutil.ignore_patterns("__pycache__")) if src.is_dir() else shutil.copy2(src, out/t))
print("copied", len(need), "distributions into", out)
EOF
  du -sh .whl; exit 0
fi

# --- on the device -------------------------------------------------------------------------------------------
if ls .whl/*.whl >/dev/null 2>&1; then   # real wheels, if any were carried
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH="$PWD:$PWD/.whl/site:/tmp/site:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
OUT="${OUT:-bench/results}"; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())"

# a) = nbdev_test --flags cuda --path $NB: the notebook's `#| cuda` cells (plain cells too), called through Python
#    since the copied packages bring no console scripts
status=0
[ "${NB:-}" = none ] || python3 -c 'import sys; from nbdev.test import nbdev_test; nbdev_test(path=sys.argv[1], flags=sys.argv[2])' \
  "${NB:-nbs/07_encoder.ipynb}" "${FLAGS-cuda}" 2>&1 | tee "$OUT/nbdev_test_cuda.log" || status=1
[ "${NB:-}" = none ] || { [ $status = 0 ] && echo "nbdev_test --flags cuda: passed" || echo "nbdev_test --flags cuda: FAILED (benchmark runs anyway)"; }

# b) the benchmark (extra options pass through, e.g. --models vit_b,vit_l,vit_h --batch 8 --precision bf16)
python3 bench/sam_encoder.py --out "$OUT/sam_encoder.json" "$@" 2>&1 | tee "$OUT/sam_encoder.log" || status=1
exit $status
