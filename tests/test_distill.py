"""SlimFlow distillation: pairs, annealing, time convention, resumable training, 2-process torchrun."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from flowpress.compress.pairs import PairConfig, Pairs, generate_pairs, load_pairs, shard_path
from flowpress.compress.slimflow import (
    DistillConfig,
    ReflowConfig,
    StudentConfig,
    anneal_beta,
    blend_noise,
    build_student,
    count_params,
    distill,
    one_step,
    reflow,
)
from flowpress.compress.train_state import read_state
from flowpress.errors import FlowpressError
from flowpress.models import StepModel, load_model, save_model
from flowpress.recipe import load_distill_recipe
from flowpress.sampling import Schedule, sample

from .conftest import DIGITS, EVALUATOR, ROOT, TEACHER

# out: where `flowpress distill` would save it; these tests build and train it in memory only
TINY_STUDENT = StudentConfig(
    out="tiny-student", block_out_channels=(8, 8), attention_levels=(), layers_per_block=1, max_param_fraction=1.0
)
PAIRS = PairConfig(n_pairs=12, steps=2, guidance=2.0, shard_size=4, batch_size=4)


class Interrupt(Exception):
    pass


def test_pairs_resume_gives_identical_pairs(tiny_model_dir, tmp_path):
    teacher = load_model(tiny_model_dir)
    whole = load_pairs(generate_pairs(teacher, PAIRS, tmp_path / "whole", progress=False), PAIRS)

    def stop_after_second(shard: int) -> None:
        if shard == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        generate_pairs(teacher, PAIRS, tmp_path / "resumed", progress=False, on_shard=stop_after_second)
    assert sorted(p.name for p in (tmp_path / "resumed").glob("pairs-*")) == [
        shard_path(tmp_path, s).name for s in (0, 1)
    ]
    (tmp_path / "resumed" / "pairs-00002.tmp").write_bytes(b"half-written")  # a crash mid-write
    written = shard_path(tmp_path / "resumed", 0).stat().st_mtime_ns
    resumed = load_pairs(generate_pairs(teacher, PAIRS, tmp_path / "resumed", progress=False), PAIRS)
    assert shard_path(tmp_path / "resumed", 0).stat().st_mtime_ns == written  # finished shards are not redone
    assert torch.equal(resumed.index, torch.arange(12))  # none lost, none duplicated
    for name in ("noise", "sample", "labels"):
        assert torch.equal(getattr(resumed, name), getattr(whole, name)), name
    # the pair's sample is the teacher's guided Heun sample from the pair's noise
    heun = Schedule(2, "heun")
    cond = teacher.class_condition(whole.labels[:4])
    traj = sample(heun, StepModel(teacher, heun), whole.noise[:4], cond, 2.0, teacher.null_condition())
    assert torch.allclose(traj.final, whole.sample[:4], atol=1e-5)


@pytest.fixture(scope="module")
def clean_pairs(tiny_model_dir, tmp_path_factory):
    """(directory of PAIRS from the tiny teacher, written once by an uninterrupted run, its sample shape)."""
    teacher = load_model(tiny_model_dir)
    return generate_pairs(
        teacher, PAIRS, tmp_path_factory.mktemp("pairs") / "clean", progress=False
    ), teacher.sample_shape


def _edit_shard(path, **changes) -> None:
    """Rewrite a shard with changes[key](tensor) in place of each named tensor (None drops the key)."""
    tensors = load_file(str(path))
    for key, change in changes.items():
        if change is None:
            del tensors[key]
        else:
            tensors[key] = change(tensors[key]).contiguous()
    save_file(tensors, str(path))


def _with_nan(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[5] = float("nan")
    return t


def _truncate(path) -> None:
    path.write_bytes(path.read_bytes()[:1000])


def test_bad_pair_shards_are_regenerated(tiny_model_dir, tmp_path, capsys):
    """A truncated shard and one holding NaN are rewritten, bit-for-bit what an untouched run writes;
    the whole shard between them is left alone; one line names each bad shard and why."""
    teacher = load_model(tiny_model_dir)
    # here, not the module fixture: the autouse thread count is set only now, and float sums depend on it
    clean, shape = generate_pairs(teacher, PAIRS, tmp_path / "clean", progress=False), teacher.sample_shape
    bad = tmp_path / "bad"
    shutil.copytree(clean, bad)
    _truncate(shard_path(bad, 0))
    _edit_shard(shard_path(bad, 2), sample=_with_nan)
    untouched = shard_path(bad, 1).stat().st_mtime_ns
    capsys.readouterr()
    pairs = load_pairs(generate_pairs(teacher, PAIRS, bad, progress=False), PAIRS, shape)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"[flowpress] {shard_path(bad, 0)}: unreadable safetensors (")
    assert lines[1] == f"[flowpress] {shard_path(bad, 2)}: sample holds NaN or inf; regenerating it"
    assert lines[0].endswith("; regenerating it")
    for s in range(3):
        assert shard_path(bad, s).read_bytes() == shard_path(clean, s).read_bytes(), s
    assert shard_path(bad, 1).stat().st_mtime_ns == untouched
    whole = load_pairs(clean, PAIRS, shape)
    for name in ("noise", "sample", "labels", "index"):
        assert torch.equal(getattr(pairs, name), getattr(whole, name)), name


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        (_truncate, "unreadable safetensors (Error while deserializing header"),
        (lambda p: _edit_shard(p, sample=_with_nan), "sample holds NaN or inf"),
        (lambda p: _edit_shard(p, labels=None), "keys ['index', 'noise', 'sample'], expected"),
        (lambda p: _edit_shard(p, index=lambda i: i + 1), "index is not 4..7"),
        (
            lambda p: _edit_shard(p, **dict.fromkeys(("noise", "sample", "labels", "index"), lambda t: t[:3])),
            "index is torch.int64 (3,), expected torch.int64 (4,)",
        ),
        (
            lambda p: _edit_shard(p, noise=lambda t: t[..., :8], sample=lambda t: t[..., :8]),
            "noise has shape (4, 1, 16, 8), expected (4, 1, 16, 16)",
        ),
        (lambda p: _edit_shard(p, sample=lambda t: t.double()), None),  # any float dtype is a sample
    ],
    ids=["truncated", "nan", "missing-key", "index", "rows", "shape", "float64-sample"],
)
def test_load_pairs_names_a_bad_shard(clean_pairs, tmp_path, fault, reason):
    """A bad shard handed straight to the loader is a one-line FlowpressError naming it, why, and the fix."""
    clean, shape = clean_pairs
    root = tmp_path / "pairs"
    shutil.copytree(clean, root)
    fault(shard_path(root, 1))
    if reason is None:
        assert len(load_pairs(root, PAIRS, shape)) == PAIRS.n_pairs
        return
    with pytest.raises(FlowpressError) as error:
        load_pairs(root, PAIRS, shape)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"{shard_path(root, 1)}: bad pair shard ({reason}")
    assert message.endswith("); re-run to regenerate it")


def test_pairs_refuse_another_config(tiny_model_dir, tmp_path):
    teacher = load_model(tiny_model_dir)
    small = PairConfig(n_pairs=2, steps=1, shard_size=2, batch_size=2)
    generate_pairs(teacher, small, tmp_path, progress=False)
    with pytest.raises(FlowpressError, match="another pair config"):
        generate_pairs(teacher, PairConfig(n_pairs=2, steps=2, shard_size=2, batch_size=2), tmp_path, progress=False)


def test_anneal_schedules_and_noise_blend():
    for kind in ("linear", "exponential", "cosine"):
        config = ReflowConfig(anneal_steps=100, anneal=kind)
        betas = [anneal_beta(k, config) for k in range(0, 121)]
        assert betas[0] == pytest.approx(1.0) and betas[100] == pytest.approx(0.0) and betas[120] == 0.0
        assert all(a >= b for a, b in zip(betas, betas[1:], strict=False)), kind
    assert anneal_beta(50, ReflowConfig(anneal_steps=100)) == pytest.approx(0.5)
    assert anneal_beta(0, ReflowConfig(anneal_steps=0)) == 0.0  # plain 2-rectified flow
    gen = torch.Generator().manual_seed(0)
    z_pair, eps = torch.randn(200_000, generator=gen), torch.randn(200_000, generator=gen)
    z = blend_noise(z_pair, 0.6, eps)
    # stays N(0, 1) (std of 2e5 draws is within 0.005 of 1) and keeps correlation sqrt(1 - 0.36) = 0.8 with z_pair
    assert abs(float(z.std()) - 1.0) < 0.01
    assert float(torch.corrcoef(torch.stack([z, z_pair]))[0, 1]) == pytest.approx(0.8, abs=0.01)


def tiny_student(tiny_model_dir):
    """TINY_STUDENT of the tiny teacher's shape and classes (random weights from the current seed)."""
    return build_student(TINY_STUDENT, load_model(tiny_model_dir))


def test_one_step_is_the_chains_one_euler_step(tiny_model_dir, tmp_path):
    """The student's x0 = z - v(z, 1, c) is what the normal chain's 1-step Euler sampler gives after load_model."""
    torch.manual_seed(0)
    student = tiny_student(tiny_model_dir)
    z, labels = torch.randn(3, 1, 16, 16), torch.tensor([0, 4, 9])
    with torch.no_grad():
        x0 = one_step(student, z, labels)
    loaded = load_model(save_model(student, tmp_path / "student"))
    one = Schedule(1)
    chain = sample(one, StepModel(loaded, one), z, loaded.class_condition(labels), 1.0, loaded.null_condition()).final
    assert torch.allclose(chain, x0, atol=1e-5)


def test_student_size_is_checked():
    teacher = load_model(TEACHER)
    teacher_params = count_params(teacher)
    assert teacher_params == 1_624_577  # examples/digits/checkpoints/digits-unet
    default = load_distill_recipe(DIGITS / "recipes" / "digits-slimflow.yaml")
    assert count_params(build_student(default.student, teacher)) <= 0.25 * teacher_params
    with pytest.raises(FlowpressError, match="exceed"):
        build_student(StudentConfig(out="unused", block_out_channels=(32, 64, 64), layers_per_block=2), teacher)


def _toy_pairs(n: int = 64) -> Pairs:
    """Pairs of a known map: x0 = -z (a straight flow with v = z - x0 = 2 z)."""
    noise = torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    return Pairs(noise, (-noise).clamp(-1, 1), torch.arange(n) % 10, torch.arange(n))


def test_training_resumes_exactly_and_learns(tiny_model_dir, tmp_path):
    pairs = _toy_pairs()
    config = ReflowConfig(iterations=8, batch_size=16, anneal_steps=4, checkpoint_every=100)
    torch.manual_seed(0)
    init = tiny_student(tiny_model_dir)
    straight = reflow(_clone(init), pairs, config, tmp_path / "a.state.safetensors", progress=False)
    resumed_model = _clone(init)
    reflow(resumed_model, pairs, config, tmp_path / "b.state.safetensors", progress=False, stop_at=3)
    resumed = reflow(resumed_model, pairs, config, tmp_path / "b.state.safetensors", progress=False)
    assert resumed.step == 8 and resumed.losses == pytest.approx(straight.losses, rel=1e-5)
    for a, b in zip(straight.ema.parameters(), resumed.ema.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    # flow-guided distillation of the reflowed model lowers its one-step loss on the pairs
    # (measured: the last 3 losses sum to 0.95 of the first 3 over 12 iterations, 80.7 -> 76.6; seeded, so exact)
    guide = straight.ema
    d_config = DistillConfig(iterations=12, batch_size=16, lr=2e-3, checkpoint_every=100)
    state = distill(
        _clone(guide).requires_grad_(True), guide, pairs, d_config, tmp_path / "d.state.safetensors", progress=False
    )
    assert sum(state.losses[-3:]) < 0.97 * sum(state.losses[:3])


def test_training_state_is_pickle_free_and_checked(tiny_model_dir, tmp_path, monkeypatch):
    """The resumable state is one safetensors file with its JSON rest in the header: resuming never
    unpickles and gives the uninterrupted run exactly; a truncated, altered or pickled state is a
    one-line FlowpressError naming the file and the fix."""
    pairs = _toy_pairs(32)
    config = ReflowConfig(iterations=6, batch_size=8, anneal_steps=3, checkpoint_every=100)
    torch.manual_seed(0)
    init = tiny_student(tiny_model_dir)
    straight = reflow(_clone(init), pairs, config, tmp_path / "a.state.safetensors", progress=False)
    path = tmp_path / "b.state.safetensors"
    resumed_model = _clone(init)
    reflow(resumed_model, pairs, config, path, progress=False, stop_at=2)
    data = path.read_bytes()
    assert not data.startswith((b"PK", b"\x80"))  # neither torch.save's zip nor a bare pickle
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])  # safetensors: length, JSON header
    meta = json.loads(header["__metadata__"]["flowpress"])
    assert meta["step"] == 2 and len(meta["losses"]) == 2 and len(meta["sha256"]) == 64
    assert {k.split("/")[0] for k in header if k != "__metadata__"} == {"model", "ema", "opt"}

    def no_unpickling(*args, **kwargs):
        raise AssertionError("the training state was unpickled")

    for module, name in ((torch, "load"), (pickle, "load"), (pickle, "loads")):
        monkeypatch.setattr(module, name, no_unpickling)
    resumed = reflow(resumed_model, pairs, config, path, progress=False)
    assert resumed.step == 6 and resumed.losses == straight.losses
    for a, b in zip(straight.ema.parameters(), resumed.ema.parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(straight.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)

    whole = path.read_bytes()
    flipped = bytearray(whole)
    flipped[-3] ^= 0x10  # one bit of the last tensor's data
    monkeypatch.undo()  # torch.save below pickles (writing, not reading)
    torch.save({"step": 1}, tmp_path / "old.pt")
    for bad, reason in (
        (whole[: len(whole) // 2], r"Error while deserializing header"),
        (bytes(flipped), r"sha256 mismatch"),
        ((tmp_path / "old.pt").read_bytes(), r"Error while deserializing header"),
    ):
        path.write_bytes(bad)
        with pytest.raises(FlowpressError) as error:
            reflow(_clone(init), pairs, config, path, progress=False)
        message = str(error.value)
        assert "\n" not in message
        assert message.startswith(f"{path}: not a whole training state (")
        assert re.search(reason, message) and message.endswith("); delete it to start that stage afresh")


def _clone(model):
    import copy

    return copy.deepcopy(model).train().requires_grad_(True)


def run_distill_cli(tiny_model_dir, tmp_path, nproc: int, cuda_visible: str | None):
    """`flowpress distill` on a tiny recipe under torchrun --nproc_per_node=nproc; returns
    (process, distill.json).  cuda_visible="" hides the GPUs (gloo on the CPU)."""
    recipe = {
        "name": "tiny-slimflow",
        "teacher": {"path": str(tiny_model_dir)},
        "sampling": {"steps": 4, "guidance": 2.0},
        "pairs": {"n_pairs": 16, "steps": 2, "shard_size": 4, "batch_size": 4},
        "student": {
            "out": str(tmp_path / "student"),
            "block_out_channels": [8, 8],
            "attention_levels": [],
            "layers_per_block": 1,
            "max_param_fraction": 1.0,
        },
        "reflow": {"iterations": 4, "batch_size": 8, "anneal_steps": 2, "checkpoint_every": 2},
        "distill": {"iterations": 3, "batch_size": 8, "checkpoint_every": 2},
        "eval": {"n_samples": 20, "batch_size": 20, "latency_runs": 1},
        "evaluator": yaml.safe_load(EVALUATOR),
        "bars": {"min_speedup": 2.0},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(recipe))  # JSON is YAML
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    if cuda_visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = cuda_visible
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += ["-m", "flowpress", "distill", "--recipe", str(path), "--runs", str(tmp_path / "runs"), "--quiet"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    report_path = tmp_path / "runs" / "tiny-slimflow" / "distill.json"
    assert report_path.is_file(), (done.stdout + done.stderr)[-3000:]
    report = json.loads(report_path.read_text())
    passed = all(bar["passed"] for bar in report["bars"].values())  # a 4-iteration run may fail one
    assert done.returncode == (0 if passed else 1), done.stderr[-3000:]
    return done, report


@pytest.mark.slow
def test_torchrun_two_processes(tiny_model_dir, tmp_path):
    """`flowpress distill` under torchrun --nproc_per_node=2 (gloo): pairs split by rank, DDP training, rank-0 report."""
    done, report = run_distill_cli(tiny_model_dir, tmp_path, 2, cuda_visible="")
    assert report["budget"]["world_size"] == 2
    assert set(report["entries"]) >= {"teacher", "student_1step", "student_2step", "baseline_1step"}
    assert done.stdout.count("[flowpress] teacher:") == 1  # only rank 0 reports
    work = tmp_path / "runs" / "tiny-slimflow-work"
    (pair_dir,) = work.glob("pairs-*")
    assert len(list(pair_dir.glob("pairs-*.safetensors"))) == 4  # both ranks' shards, none twice
    checkpoints = sorted(work.glob("*.state.safetensors"))
    assert len(checkpoints) == 4
    for ckpt in checkpoints:
        assert read_state(ckpt).meta["step"] == (4 if "reflow" in ckpt.name else 3), ckpt.name
    student = load_model(tmp_path / "student")
    assert count_params(student) == report["entries"]["student_1step"]["params"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible to torch")
def test_distill_on_a_gpu(tiny_model_dir, tmp_path):
    """The whole `flowpress distill` (pairs, reflow, distillation, evaluation) on one CUDA GPU."""
    _, report = run_distill_cli(tiny_model_dir, tmp_path, 1, cuda_visible=None)
    assert report["budget"]["world_size"] == 1 and report["machine"].endswith("1 process(es), cuda")
    assert set(report["entries"]) >= {"teacher", "student_1step", "student_2step", "baseline_1step"}
