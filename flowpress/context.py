"""What a run needs once: the recipe, the model, its sampler, conditioning and evaluator, the host."""

from __future__ import annotations

import ctypes
import platform
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from flowpress.engines.isa import HostIsa, host_isa
from flowpress.errors import FlowpressError
from flowpress.evaluator import load_evaluator
from flowpress.models import Conditions, DiffusersDenoiser, LoadedModel, StepModel, load_source, read_prompts
from flowpress.models.conditioning import CALIBRATION_PROMPTS, COMPARE_PROMPTS
from flowpress.recipe import Recipe
from flowpress.sampling import Cond, Sampler
from flowpress.validation import CompareConfig, Evaluator

PACKAGES = (
    "torch",
    "onnx",
    "onnxruntime",
    "onnxscript",
    "nvidia-modelopt",
    "brevitas",
    "diffusers",
    "openvino",
    "nncf",
    "numpy",
)


def resident_bytes() -> tuple[int, int]:
    """(resident, peak resident over the process's life) bytes of this process (Linux /proc)."""
    found = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = int(value.split()[0]) * 1024
    return found.get("VmRSS", 0), found.get("VmHWM", 0)


def trim_heap() -> None:
    """Hand the C heap's free pages back to the system (glibc's malloc_trim; a no-op elsewhere):
    the activations a stage freed would otherwise stay resident under every later stage's peak."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _Window:
    """The largest resident size seen since `peak` was last reset (by its Timer)."""

    def __init__(self) -> None:
        self.peak = resident_bytes()[0]


SAMPLE_SECONDS = 0.1
_WINDOWS: weakref.WeakSet[_Window] = weakref.WeakSet()  # a Timer's window goes with its Timer
_LOCK = threading.Lock()
_SAMPLER: list[threading.Thread] = []


def _sample_forever() -> None:
    """One daemon thread per process: every SAMPLE_SECONDS, the resident size into each open window
    (the kernel's own peak is left alone, so GNU time and a parent's ru_maxrss see the true peak)."""
    while True:
        time.sleep(SAMPLE_SECONDS)
        rss = resident_bytes()[0]
        with _LOCK:
            for window in list(_WINDOWS):
                window.peak = max(window.peak, rss)


def _open_window() -> _Window:
    window = _Window()
    with _LOCK:
        _WINDOWS.add(window)
        if not _SAMPLER:
            _SAMPLER.append(threading.Thread(target=_sample_forever, name="flowpress-rss", daemon=True))
            _SAMPLER[0].start()
    return window


class Timer:
    """Wall seconds and peak resident bytes per named stage (stages may nest: an inner stage's
    peak counts for the outer ones too; sampled, see _sample_forever); peak_rss_bytes: the
    process's peak so far (the kernel's VmHWM, exact)."""

    def __init__(self, announce: bool = False) -> None:
        self.announce = announce  # a line on stdout as each stage starts and ends
        self.seconds: dict[str, float] = {}
        self.peak_rss: dict[str, int] = {}
        self.peak_rss_bytes = 0
        self.failed_in: str | None = None  # the innermost stage an exception left
        self._open: list[str] = []
        self._window = _open_window()

    def _checkpoint(self) -> None:
        """Fold the peak since the last checkpoint into every open stage and the run; new window."""
        rss = resident_bytes()[0]
        with _LOCK:
            peak, self._window.peak = max(self._window.peak, rss), rss
        for name in self._open:
            self.peak_rss[name] = max(self.peak_rss.get(name, 0), peak)
        self.peak_rss_bytes = max(self.peak_rss_bytes, peak, resident_bytes()[1])

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self._checkpoint()
        self._open.append(name)
        self.peak_rss[name] = resident_bytes()[0]
        if self.announce:
            print(f"[flowpress] {name} ...", flush=True)
        start = time.perf_counter()
        try:
            yield
        except BaseException:
            self.failed_in = self.failed_in or name
            raise
        finally:
            trim_heap()
            self._checkpoint()
            self._open.remove(name)
            self.seconds[name] = round(time.perf_counter() - start, 3)
            if self.announce:
                peak = self.peak_rss[name] / 1e9
                print(f"[flowpress] {name}: {self.seconds[name]:.1f} s, peak {peak:.2f} GB resident", flush=True)

    def as_dict(self) -> dict[str, dict[str, float]]:
        """{stage: {seconds, peak_rss_bytes}} of the finished stages, in the order they ran."""
        return {n: {"seconds": s, "peak_rss_bytes": self.peak_rss.get(n, 0)} for n, s in self.seconds.items()}


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "missing"
    return found


@dataclass
class RunContext:
    """Built once per run: the model and its FP step model on its sampler (the schedule is built
    here and nowhere else), its conditioning (and prompts), the latent decoder, the evaluator, the host."""

    recipe: Recipe
    source: LoadedModel
    sampler: Sampler
    fp: StepModel
    evaluator: Evaluator | None
    host: HostIsa
    calibration_prompts: tuple[str, ...]
    compare_prompts: tuple[str, ...]
    timer: Timer = field(default_factory=Timer)

    @classmethod
    def load(cls, recipe: Recipe, timer: Timer | None = None, loaded: LoadedModel | None = None) -> RunContext:
        """loaded: the recipe's model, when the caller loaded it already (as recipe.model says)."""
        section = recipe.model
        source = loaded or load_source(
            Path(section.path), section.time_scale, section.scheduler, section.prediction_type, section.resolution,
            section.lora, section.lora_scale,
        )  # fmt: skip
        sampler = source.sampler(recipe.sampling.steps, recipe.sampling.method)
        evaluator = load_evaluator(recipe.evaluator)
        measured = evaluator.metrics if evaluator is not None else {}
        unknown = sorted(set(recipe.gate.metrics) - set(measured))
        if unknown:
            raise FlowpressError(
                f"{recipe.name}: gate.metrics.{unknown[0]}: the recipe's evaluator measures "
                f"{sorted(measured) or 'nothing (no evaluator)'}; bound one of those or remove it"
            )
        fp = StepModel(source.denoiser, sampler).eval()
        calibration = read_prompts(recipe.prompts.calibration, CALIBRATION_PROMPTS)
        compare = read_prompts(recipe.prompts.compare, COMPARE_PROMPTS)
        return cls(recipe, source, sampler, fp, evaluator, host_isa(), calibration, compare, timer or Timer())

    @property
    def model(self) -> DiffusersDenoiser:
        return self.source.denoiser

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.model.sample_shape

    @property
    def null(self) -> Cond:
        return self.source.conditioner.null()

    def conditions(self, n: int, offset: int = 0) -> Conditions:
        """The compare's conditioning of samples offset..offset+n-1 (classes or compare prompts cycling)."""
        return self.source.conditioner.conditions(n, offset, self.compare_prompts)

    def cond(self, n: int, offset: int = 0) -> Cond:
        """conditions(n, offset) as engine inputs."""
        return self.conditions(n, offset).model

    def calibration_cond(self, n: int) -> Cond:
        """The calibration trajectories' conditioning (classes cycling, or the calibration prompts)."""
        return self.source.conditioner.conditions(n, 0, self.calibration_prompts).model

    def condition(self, batch: int) -> Cond:
        """Conditioning of a timing batch (class 0, zero embeddings)."""
        return self.model.example_condition(batch)

    @property
    def compare_config(self) -> CompareConfig:
        section = self.recipe.compare
        return CompareConfig(
            section.n_samples, section.seed_base, section.batch_size, self.recipe.sampling.guidance, self.recipe.gate
        )
