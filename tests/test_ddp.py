"""DDP with 2 CPU processes (gloo, launched by `torch.distributed.run`): both ranks end with identical weights, equal
to one process training with the same global batch (2 ranks x batch 2 == 1 process x batch 4, same accumulation)."""
import os, sys, subprocess, socket
from pathlib import Path
import pytest
import torch
from ullsam_nb.train import ToyTask, Trainer, weights_hash
from ullsam_nb.train_parts import make_config

SCRIPT = r'''
import sys, torch
from pathlib import Path
from ullsam_nb.train import ToyTask, Trainer
from ullsam_nb.train_parts import make_config, init_distributed
out = Path(sys.argv[1])
info = init_distributed("cpu")
task = ToyTask(n=40, dropout=0.0)
cfg = make_config(epochs=2, batch_size=2, accumulation=2, lr=1e-2, monitor="score", device="cpu")
res = Trainer(task, cfg, out/"run", dist=info, quiet=True).fit()
torch.save(task.model.state_dict(), out/f"rank{info.rank}.pt")
(out/f"rank{info.rank}.steps").write_text(str(res["step"]))
'''

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]

@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    (out/"worker.py").write_text(SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", ULLSAM_QUIET="1", ULLSAM_DEVICE="cpu", ULLSAM_CACHE_DIR=str(out/"cache"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(out/"worker.py"), str(out)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return out

def test_ranks_identical(ddp_run):
    a, b = (torch.load(ddp_run/f"rank{i}.pt", weights_only=True) for i in (0, 1))
    assert a.keys() == b.keys()
    for k in a: assert torch.equal(a[k], b[k]), k
    # 40 samples / 2 ranks / batch 2 = 10 batches per epoch, 2 per optimizer step -> 5 steps per epoch, 10 in all
    assert (ddp_run/"rank0.steps").read_text() == (ddp_run/"rank1.steps").read_text() == "10"

def test_equals_single_process_with_same_global_batch(ddp_run, tmp_path):
    task = ToyTask(n=40, dropout=0.0)
    cfg = make_config(epochs=2, batch_size=4, accumulation=2, lr=1e-2, monitor="score", device="cpu")
    Trainer(task, cfg, tmp_path/"single", quiet=True).fit()
    ddp = torch.load(ddp_run/"rank0.pt", weights_only=True)
    single = task.model.state_dict()
    for k in ddp: torch.testing.assert_close(ddp[k], single[k], rtol=1e-5, atol=1e-6)   # equal up to summation order

def test_only_rank0_writes(ddp_run):
    run = ddp_run/"run"
    assert (run/"model.safetensors").exists() and (run/"log.csv").exists() and (run/"checkpoints"/"last.pt").exists()
    import pandas as pd
    df = pd.read_csv(run/"log.csv")
    assert list(df[df.kind == "train"].step) == list(range(1, 11))         # one writer: no duplicated rows
    assert not list(run.glob("**/*.tmp"))

SCRIPT_TINY = r'''
import sys, torch
from pathlib import Path
from ullsam_nb.stages import train_cmd
from ullsam_nb.train_parts import init_distributed
out, world = Path(sys.argv[1]), sys.argv[2]
info = init_distributed("cpu")
s = f"mode=baseline,data={world},val_data={world},max_train_images=4,max_val_images=1,batch_size=1,epochs=1,device=cpu"
train_cmd(str(out/"run"), preset="tiny", set=s, quiet=True)
'''

@pytest.mark.skipif(not os.environ.get("ULLSAM_SLOW"), reason="slow: set ULLSAM_SLOW=1")
def test_ddp_tiny_segmentation(tmp_path):
    "The real stage-3 task under torchrun (2 gloo ranks): runs, and rank 0 writes a loadable model."
    from ullsam_nb.synth import make_world
    world = make_world(tmp_path/"world", n=4, seed=3)
    (tmp_path/"worker.py").write_text(SCRIPT_TINY)
    env = dict(os.environ, OMP_NUM_THREADS="1", ULLSAM_QUIET="1", ULLSAM_DEVICE="cpu")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(tmp_path/"worker.py"), str(tmp_path), str(world)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    from ullsam_nb.model import ULLSAM
    assert ULLSAM.load(tmp_path/"run").config.mode == "baseline"
