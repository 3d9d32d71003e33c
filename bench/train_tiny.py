"""A short run of the `tiny` preset (tiny SAM + tiny LLM on the synthetic world, CPU-size): validation mSA and Dice
per epoch, written to bench/results/train_tiny.json. Usage: python bench/train_tiny.py [--mode ullsam] [--epochs 4] [--quick]"""
import argparse, json, os, sys, time, tempfile
from pathlib import Path

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mode", default="ullsam")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true", help="8 train / 4 val images, 2 epochs")
    ap.add_argument("--set", default="", help="extra KEY=VALUE settings")
    a = ap.parse_args(argv)
    from ullsam_nb.stages import train_cmd, load_config
    from ullsam_nb.train_parts import read_log
    out = Path(a.out or tempfile.mkdtemp(prefix="train_tiny_"))
    extra = [f"mode={a.mode}"] + ([f"epochs={a.epochs}"] if a.epochs else []) + \
            (["max_train_images=8", "max_val_images=4", "epochs=2"] if a.quick else []) + ([a.set] if a.set else [])
    t0 = time.perf_counter()
    # epoch-0 baseline: validate the untrained model first (same prompts), for the "rising" comparison
    from ullsam_nb.stages import build_task, _parse_set
    from ullsam_nb.train import Trainer
    cfg = load_config(preset="tiny", **_parse_set(",".join(extra)))
    task = build_task(cfg)
    import torch
    task.model.eval()
    with torch.no_grad(): before = task.validate()
    rc = train_cmd(str(out), preset="tiny", set=",".join(extra), quiet=True)
    wall = time.perf_counter() - t0
    df = read_log(out/"log.csv")
    for c in ("mSA", "SA50", "dice"):
        if c not in df.columns: df[c] = float("nan")
    val = df[df.kind == "val"][["epoch", "step", "mSA", "SA50", "dice"]]
    tr = df[df.kind == "train"]
    rows = [dict(epoch=0, step=0, **{k: round(float(before[k]), 4) for k in ("mSA", "SA50", "dice")})] + \
           [dict(epoch=int(r.epoch), step=int(r.step), mSA=round(float(r.mSA), 4), SA50=round(float(r.SA50), 4), dice=round(float(r.dice), 4))
            for r in val.itertuples()]
    res = dict(bench="train_tiny", mode=a.mode, quick=a.quick, settings=extra, rc=rc, wall_s=round(wall, 1),
               n_train=len(task.train_dataset), n_val=len(task.val_dataset), steps=int(tr.step.max()),
               first_loss=round(float(tr.loss.iloc[0]), 4), last_loss=round(float(tr.loss.iloc[-1]), 4), val=rows,
               machine="2 shared CPU cores (about 8 agents), no GPU")
    print(f"{'epoch':>5} {'step':>5} {'mSA':>7} {'SA50':>7} {'dice':>7}")
    for r in rows: print(f"{r['epoch']:>5} {r['step']:>5} {r['mSA']:>7.4f} {r['SA50']:>7.4f} {r['dice']:>7.4f}")
    print(f"train loss {res['first_loss']} -> {res['last_loss']} in {res['steps']} steps, {wall:.0f} s")
    dest = Path(__file__).parent/"results"/"train_tiny.json"
    from ullsam_nb.basics import save_json
    save_json(res, dest)
    return 0

if __name__ == "__main__": sys.exit(main())
