"""`python -m examples.digits teacher|classifier`: train the demo's models (make teacher / make classifier)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from examples.digits.classifier import ClassifierConfig, train_classifier
from examples.digits.evaluator import CLASSIFIER, DigitsEvaluator
from examples.digits.pipelines import TrainConfig
from examples.digits.teacher import TeacherConfig, train_teacher
from flowpress.errors import FlowpressError
from flowpress.models import StepModel, load_model
from flowpress.sampling import Schedule, noise_for_seeds, sample
from flowpress.schema import load


@dataclass(frozen=True)
class TeacherRecipe:
    name: str
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    classifier: str = CLASSIFIER


@torch.no_grad()
def teacher_accuracy(model_dir: Path, config: TeacherConfig, classifier: str) -> float:
    """Fraction of eval_samples samples (eval_steps Euler steps, classes cycling) the classifier reads as their class."""
    model = load_model(model_dir)
    schedule = Schedule(config.eval_steps)
    step_model = StepModel(model, schedule)
    labels = torch.arange(config.eval_samples) % 10
    finals = []
    for start in range(0, config.eval_samples, 100):
        chunk = list(range(start, min(config.eval_samples, start + 100)))
        cond = {"class_labels": labels[chunk]}
        noise = noise_for_seeds(chunk, model.sample_shape)
        finals.append(sample(schedule, step_model.run, noise, cond, config.eval_guidance, model.null_condition()).final)
    return DigitsEvaluator(classifier).score(torch.cat(finals), {"class_labels": labels})["classifier_acc"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.digits", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("teacher", help="train a digits teacher (and the classifier when missing)")
    t.add_argument("--recipe", default="examples/digits/recipes/digits-teacher.yaml")
    k = sub.add_parser("classifier", help="train the digit classifier the evaluator uses")
    k.add_argument("--out", default=CLASSIFIER)
    d = sub.add_parser("ddpm", help="train digits-ddpm: an ε-prediction DDPMPipeline")
    d.add_argument("--out", default="examples/digits/checkpoints/digits-ddpm")
    d.add_argument("--steps", type=int, default=TrainConfig.steps)
    s = sub.add_parser("sd", help="train digits-sd: a text-to-image latent pipeline (VAE, CLIP, UNet2DConditionModel)")
    s.add_argument("--out", default="examples/digits/checkpoints/digits-sd")
    s.add_argument("--steps", type=int, default=TrainConfig.steps)
    s.add_argument("--vae-steps", type=int, default=TrainConfig.vae_steps)
    for p in (t, k, d, s):
        p.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    progress = not args.quiet
    try:
        if args.command in ("ddpm", "sd"):
            from examples.digits.pipelines import train_ddpm, train_sd

            train = TrainConfig(steps=args.steps, vae_steps=getattr(args, "vae_steps", TrainConfig.vae_steps))
            out = (train_ddpm if args.command == "ddpm" else train_sd)(Path(args.out), train, progress)
            print(f"[digits] {out}: trained ({train.steps} steps)")
            return 0
        if args.command == "classifier":
            out, accuracy = train_classifier(ClassifierConfig(out=args.out), progress)
            print(f"[digits] classifier {out}: held-out accuracy {accuracy:.2%}")
            return 0
        recipe: TeacherRecipe = load(TeacherRecipe, args.recipe)
        if not (Path(recipe.classifier) / "model.safetensors").is_file():
            train_classifier(ClassifierConfig(out=recipe.classifier), progress)
        config = recipe.teacher
        out = train_teacher(config, progress)
        accuracy = teacher_accuracy(out, config, recipe.classifier)
        meta = json.loads((out / "flowpress.json").read_text())
        meta["eval"] = {"classifier_acc": accuracy, "samples": config.eval_samples, "steps": config.eval_steps,
                        "guidance": config.eval_guidance}  # fmt: skip
        (out / "flowpress.json").write_text(json.dumps(meta, indent=2) + "\n")
        print(f"[digits] teacher {out}: {accuracy:.1%} of {config.eval_samples} samples recognised as their class")
        return 0
    except FlowpressError as err:
        print(f"digits: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
