#!/usr/bin/env bash
# Every GPU check and benchmark of issue 17 in ONE device call of at most 9 minutes (H100/H200, no network there).
#
#   bash bench/gpu_tests.sh --prepare      here, once: copy the pure-Python packages the GPU image lacks (segment-anything,
#                                          nbdev and its dependencies) from .venv into .whl/site/ (git-ignored)
#   bash bench/gpu_tests.sh                on the device (tool `run`, carry [".whl"], timeout_s 540): the stages below
#   bash bench/gpu_tests.sh --cpu-smoke    here: the same stages at tiny sizes on the CPU (about 3 minutes on 2 cores)
#
# Stages, each under its own time cap (seconds, GPU), a failing or timed-out stage does not stop the others:
#   cuda      (75)  nbdev_test --flags cuda on nbs/07_encoder.ipynb: ViT-B fast paths vs the reference (fp32, bf16,
#                   gradients), and every mode (baseline, ullsam, frozen_vlk) trains two steps and evaluates with the
#                   fast encoder
#   pretrain  (45)  nbdev_test --flags cuda on nbs/15a_pretrain.ipynb: a pretraining, a head and a refine run (two steps
#                   each) train, validate and save on the GPU
#   encoder_b (120) bench/sam_encoder.py: ViT-B 1024^2 bf16 batch 8, forward and forward+backward, the reference and
#                   every variant in one process (ratios to the reference, % of the measured bf16 peak)
#   encoder_lh (75) the same for ViT-L and ViT-H, reference and augment (the CUDA `auto` path)
#   train_step(170) bench/train_step.py: joint stage-3 step, reference vs ours (batch 1, 8, 32), frozen_vlk steady state
#                   (batch 32, features on the device), model FLOPs and MFU, the largest batch per mode in 24 GiB
#   vlk        (40) bench/vlk.py: VLK extraction, batched bf16 vs the plain eager path
# Output: $OUT (else bench/results/): gpu_tests.json (summary: every stage's exit status, seconds and JSON),
# gpu_tests.log (all output) and one JSON per benchmark -- 6 files.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare" ]; then
  . .venv/bin/activate
  python - <<'EOF'
import importlib.metadata as md, shutil, pathlib
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

SMOKE=0; [ "${1:-}" = "--cpu-smoke" ] && { SMOKE=1; shift; }
OUT="${OUT:-bench/results}"; mkdir -p "$OUT"
LOG="$OUT/gpu_tests.log"; : > "$LOG"
STAGES="$OUT/.stages.tsv"; : > "$STAGES"
export PYTHONUNBUFFERED=1
if [ $SMOKE = 1 ]; then
  [ -f .venv/bin/activate ] && . .venv/bin/activate
  PY=python; export CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"
else
  if ls .whl/*.whl >/dev/null 2>&1; then   # real wheels, if any were carried
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  fi
  export PYTHONPATH="$PWD:$PWD/.whl/site:/tmp/site:${PYTHONPATH:-}"
  PY=python3
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG" || true
fi
$PY -c "import torch; print('torch', torch.__version__, 'cuda:', torch.cuda.is_available() and torch.cuda.get_device_name())" 2>&1 | tee -a "$LOG"

stage() {   # stage NAME GPU_CAP_SECONDS JSON_OR_- COMMAND...
  local name=$1 cap=$2 json=$3; shift 3
  [ $SMOKE = 1 ] && cap=$((cap * 3))
  echo "=== $name (cap ${cap}s): $*" | tee -a "$LOG"
  local t0=$SECONDS
  timeout --kill-after=10 "$cap" "$@" 2>&1 | grep -v --line-buffered 'it/s]$' | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - t0))s$([ $rc = 124 ] && echo ' (TIMED OUT)')" | tee -a "$LOG"
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" "$json" >> "$STAGES"
}

if [ $SMOKE = 1 ]; then
  stage cuda 75 - $PY -c 'import sys; from nbdev.test import nbdev_test; nbdev_test(path=sys.argv[1])' nbs/07_encoder.ipynb
  stage pretrain 45 - $PY -c 'import sys; from nbdev.test import nbdev_test; nbdev_test(path=sys.argv[1])' nbs/15a_pretrain.ipynb
  stage encoder_b 120 "$OUT/sam_encoder_b.json" $PY bench/sam_encoder.py --quick --batch 2 --precision fp32 \
    --variants sam,mask,augment --iters 2 --warmup 1 --out "$OUT/sam_encoder_b.json"
  stage encoder_lh 75 "$OUT/sam_encoder_lh.json" $PY bench/sam_encoder.py --quick --models tiny --img-size 128 --batch 1 \
    --precision fp32 --variants sam,augment --iters 2 --warmup 1 --out "$OUT/sam_encoder_lh.json"
  stage train_step 170 "$OUT/train_step.json" $PY bench/train_step.py --quick --steps 1 --out "$OUT/train_step.json"
  stage vlk 40 "$OUT/vlk.json" $PY bench/vlk.py --quick --images 4 --batch 2 --out "$OUT/vlk.json"
else
  stage cuda 75 - $PY -c 'import sys; from nbdev.test import nbdev_test; nbdev_test(path=sys.argv[1], flags="cuda")' nbs/07_encoder.ipynb
  stage pretrain 45 - $PY -c 'import sys; from nbdev.test import nbdev_test; nbdev_test(path=sys.argv[1], flags="cuda")' nbs/15a_pretrain.ipynb
  stage encoder_b 120 "$OUT/sam_encoder_b.json" $PY bench/sam_encoder.py --models vit_b --batch 8 --precision bf16 \
    --mode fwd,fwdbwd --variants sam,mask,augment,flex,compiled --warmup 3 --iters 10 --out "$OUT/sam_encoder_b.json"
  stage encoder_lh 75 "$OUT/sam_encoder_lh.json" $PY bench/sam_encoder.py --models vit_l,vit_h --batch 8 --precision bf16 \
    --mode fwd,fwdbwd --variants sam,augment --warmup 2 --iters 5 --out "$OUT/sam_encoder_lh.json"
  stage train_step 170 "$OUT/train_step.json" $PY bench/train_step.py --steps 6 --batches 1,8,32 --fvlk-batch 32 \
    --out "$OUT/train_step.json"
  stage vlk 40 "$OUT/vlk.json" $PY bench/vlk.py --batch 8 --images 32 --out "$OUT/vlk.json"
fi

$PY - "$STAGES" "$OUT/gpu_tests.json" "$SMOKE" <<'EOF'
import json, sys, pathlib, datetime
rows, out, smoke = pathlib.Path(sys.argv[1]).read_text().splitlines(), sys.argv[2], sys.argv[3] == "1"
stages = {}
for line in rows:
    name, rc, secs, path = line.split("\t")
    st = dict(exit=int(rc), seconds=int(secs), timed_out=rc in ("124", "137"))
    if path != "-":
        try: st["result"] = json.loads(pathlib.Path(path).read_text())
        except Exception as e: st["result"] = None; st["result_error"] = f"{type(e).__name__}: {e}"
    stages[name] = st
summary = dict(script="bench/gpu_tests.sh", cpu_smoke=smoke, finished=datetime.datetime.now().isoformat(timespec="seconds"),
               passed=all(s["exit"] == 0 for s in stages.values()), stages=stages)
tmp = pathlib.Path(out + ".tmp"); tmp.write_text(json.dumps(summary, indent=1)); tmp.replace(out)
print("stages:", {k: ("ok" if v["exit"] == 0 else f"exit {v['exit']}") for k, v in stages.items()}, "->", out)
sys.exit(0 if summary["passed"] else 1)
EOF
status=$?
rm -f "$STAGES"
exit $status
