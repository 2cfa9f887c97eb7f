"""quantize on several processes (torch.distributed, gloo): the same bytes and numbers as one
process, a killed rank stops every rank in one line with nothing written, ranks started on other
inputs are refused before any work."""

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flowpress.ranks import gathered, reduce_max, run_sharded, shard

from .conftest import EVALUATOR, ROOT

RECIPE = """
name: tiny-ranks
model: {{path: {model}}}
sampling: {{steps: 4, guidance: 2.0}}
calibration: {{n_samples: 8, batch_size: 4}}
engine: {{candidates: false}}
compare: {{n_samples: 12, batch_size: 4, latency_runs: 2}}
gate: {{min_final_psnr_db: {psnr}, metrics: {{classifier_acc: {{max_drop: 0.5}}}}}}
evaluator: {evaluator}
"""
REPORTED = ("report.json", "report.md", "manifest.json", "samples.png", "trajectory_error.png")  # hold times


def write_recipe(folder: Path, model: Path, psnr: float = 10.0, name: str = "recipe.yaml") -> Path:
    path = folder / name
    path.write_text(RECIPE.format(model=model, psnr=psnr, evaluator=EVALUATOR))
    return path


def quantize(recipe: Path, runs: Path, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "flowpress", "quantize", "--recipe", str(recipe), "--runs", str(runs), "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [*command, *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finished(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def files_of(run: Path) -> dict[str, str]:
    return {
        str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run.rglob("*"))
        if p.is_file() and p.name not in REPORTED
    }


def flowpress_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("flowpress:")]


def test_the_shards_cover_every_unit_once_in_order_on_one_process():
    assert shard(["a", "b", "c"]) == [(0, "a"), (1, "b"), (2, "c")]
    assert run_sharded([3, 1, 2], lambda x: x * 10) == [30, 10, 20]
    assert gathered({1: "b", 0: "a"}, 2) == ["a", "b"]
    import torch

    values = torch.tensor([1.0, 2.0])
    reduce_max([values])
    assert values.tolist() == [1.0, 2.0]


@pytest.mark.slow
def test_two_ranks_write_the_bytes_and_numbers_of_one_process(tiny_model_dir, tmp_path):
    """A gate the tiny model cannot pass: both runs are written whole and exit 1 (rank 0's verdict)."""
    recipe = write_recipe(tmp_path, tiny_model_dir, psnr=99.0)
    one = finished(quantize(recipe, tmp_path / "one"))
    two = finished(quantize(recipe, tmp_path / "two", "--nproc-per-node", "2"))
    assert one[0] == 1 and two[0] == 1, (one[2] + two[2])[-3000:]
    assert flowpress_lines(two[2]) == [] and two[1].count("gate: FAILED") == 1  # rank 0 alone reports
    run_one, run_two = tmp_path / "one" / "tiny-ranks", tmp_path / "two" / "tiny-ranks"
    files = files_of(run_one)
    assert "engine/model.opt.onnx" in files and "calibration/inputs.safetensors" in files
    assert files_of(run_two) == files
    report_one, report_two = (json.loads((r / "report.json").read_text()) for r in (run_one, run_two))
    for key in ("per_step", "final", "quality", "gate", "weight_forms"):
        assert report_two[key] == report_one[key], key
    manifest = json.loads((run_two / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and json.loads((run_one / "manifest.json").read_text())["world_size"] == 1
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["tiny-ranks"]  # no lock, nothing staged


def _children(pid: int) -> dict[int, dict[str, str]]:
    """{pid: environment} of the processes whose parent is `pid` (Linux /proc)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                raw = (stat.parent / "environ").read_bytes().split(b"\0")
                found[int(stat.parent.name)] = dict(e.decode().partition("=")[::2] for e in raw if b"=" in e)
        except (OSError, ValueError, IndexError):
            continue
    return found


@pytest.mark.slow
def test_a_killed_rank_stops_every_rank_in_one_line_and_nothing_is_written(tiny_model_dir, tmp_path):
    runs = tmp_path / "runs"
    launcher = quantize(write_recipe(tmp_path, tiny_model_dir), runs, "--nproc-per-node", "2")
    deadline = time.time() + 120
    while not (runs / ".tiny-ranks.partial").is_dir():  # the run is staged: the ranks are at work
        assert launcher.poll() is None and time.time() < deadline, launcher.communicate()[1][-2000:]
        time.sleep(0.05)
    (victim,) = [pid for pid, env in _children(launcher.pid).items() if env.get("RANK") == "1"]
    os.kill(victim, signal.SIGKILL)
    code, _, err = finished(launcher)
    assert code == 2, err[-2000:]
    lines = flowpress_lines(err)
    assert len(lines) == 1 and lines[0].startswith("flowpress: error: rank 1 of 2 was killed by SIGKILL"), err
    assert sorted(p.name for p in runs.iterdir()) == [], "a run directory, its staging or its lock was left"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_ranks_started_on_other_recipes_are_refused_before_any_work(tiny_model_dir, tmp_path):
    """Two torchrun nodes on this host, each with its own recipe file (a node with another copy)."""
    port, runs = _free_port(), tmp_path / "runs"
    nodes = []
    for node, psnr in ((0, 10.0), (1, 12.0)):
        recipe = write_recipe(tmp_path, tiny_model_dir, psnr, f"node{node}.yaml")
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
                   "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port),
                   "-m", "flowpress", "quantize", "--recipe", str(recipe), "--runs", str(runs), "--quiet"]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        nodes.append(
            subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    for process in nodes:
        code, _, err = finished(process, 240)
        assert code != 0
        line = "flowpress: error: rank 1 was started with another recipe than rank 0"
        assert any(seen.startswith(line) for seen in flowpress_lines(err)), err[-3000:]
    assert not runs.exists() or sorted(p.name for p in runs.iterdir()) == []
