"""The `ullsam` console script: installed, lists its commands, --version, clear errors."""
import inspect, subprocess, sys
import pytest
from ullsam_nb import __version__
from ullsam_nb.cli import COMMANDS, command_function, command_parser, main

def run(*args):
    return subprocess.run(["ullsam", *args], capture_output=True, text=True)

def test_console_script_help_lists_every_command():
    r = run("--help")
    assert r.returncode == 0, r.stderr
    for name in COMMANDS: assert name in r.stdout

def test_version():
    r = run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"ullsam_nb {__version__}"

def test_every_command_resolves_and_has_help():
    for name, (mod, fn, hlp) in COMMANDS.items():
        f = command_function(name)
        assert inspect.getdoc(f).splitlines()[0] == hlp, f"help of {name} differs from {mod}.{fn}'s docstring"
        text = command_parser(f, f"ullsam {name}").format_help()
        assert f"ullsam {name}" in text

def test_unknown_command_is_an_error():
    r = run("no-such-command")
    assert r.returncode == 2 and "unknown command" in r.stderr

def test_info_json():
    import json
    r = run("info", "--json-out")
    assert r.returncode == 0
    assert json.loads(r.stdout)["ullsam_nb"] == __version__

def test_input_error_exits_2_with_the_file(tmp_path, monkeypatch, capsys):
    from ullsam_nb import cli
    from ullsam_nb.basics import InputError
    def broken_cmd(path:str): # a file
        "Always fails."
        raise InputError("not a label map", path)
    monkeypatch.setitem(COMMANDS, "broken", ("ullsam_nb.cli", "broken_cmd", "Always fails."))
    monkeypatch.setattr(cli, "broken_cmd", broken_cmd, raising=False)
    assert main(["broken", "--path", "x/y.tif"]) == 2
    assert "x/y.tif: not a label map" in capsys.readouterr().err

def test_evaluate_scores_the_floors_beside_the_predictions(tmp_path):
    import numpy as np
    from ullsam_nb.io import write_labels, write_image
    gt = np.zeros((32, 32), np.uint16); gt[4:12, 4:12] = 1; gt[18:28, 16:30] = 2
    write_labels(tmp_path/"gt/a.png", gt); write_labels(tmp_path/"pred/a.png", gt)
    write_image(tmp_path/"img/a.png", np.where(gt > 0, 220, 30).astype(np.uint8))
    args = ("evaluate", "--pred", str(tmp_path/"pred"), "--gt", str(tmp_path/"gt"), "--images", str(tmp_path/"img"))
    r = run(*args)
    assert r.returncode == 0, r.stderr
    assert all(f in r.stdout for f in ("floor:box", "floor:otsu_box", "floor:watershed_click", "floor:otsu_watershed"))
    r = run(*args, "--prompts", "lasso")
    assert r.returncode == 2 and "unknown prompt type 'lasso'" in r.stderr

def test_pretrain_runs_on_the_named_device_and_records_it(tmp_path):
    "`ullsam pretrain --device cpu` trains, saves and says where it ran; a device this machine lacks is one line, exit 2."
    import json, torch
    r = run("pretrain", "--out", str(tmp_path/"run"), "--steps", "2", "--batch-size", "2", "--real", "none", "--device", "cpu", "--threads", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path/"run"/"pretrain.json").read_text())["device"] == "cpu"
    assert (tmp_path/"run"/"sam.safetensors").exists()
    missing = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"
    r = run("pretrain", "--out", str(tmp_path/"gpu"), "--steps", "2", "--real", "none", "--device", missing)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and f"device '{missing}' is not here" in r.stderr, r.stderr
    assert not (tmp_path/"gpu"/"pretrain.json").exists()
