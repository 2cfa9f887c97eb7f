"""DigitsEvaluator: how recognisable a set of 16x16 digit samples is, by the committed classifier.

classifier_acc: the fraction of samples the classifier reads as the class they were drawn for;
fd: the Frechet distance of the classifier's features to those of all 1,797 real digits."""

from __future__ import annotations

from functools import cache
from typing import Any

import numpy as np
import torch
from torch import Tensor

from examples.digits.classifier import DigitClassifier, load_classifier
from examples.digits.data import load_digits
from flowpress.errors import FlowpressError
from flowpress.validation import frechet_distance

CLASSIFIER = "examples/digits/checkpoints/digits-classifier"


@cache
def _real_features(classifier_path: str) -> np.ndarray:
    """Classifier features of every real digit (the Frechet distance's reference), once per process."""
    classifier = load_classifier(classifier_path)
    with torch.no_grad():
        return torch.cat([classifier.embed(chunk) for chunk in load_digits("all").images.split(256)]).numpy()


class DigitsEvaluator:
    """flowpress.engines.Evaluator for digit samples: asked for a class (class labels, or prompts
    naming a digit, "a bold handwritten seven") -> classifier_acc and fd; unconditional
    (conditional: false) -> fd and classifier_confidence (the mean top class probability)."""

    def __init__(self, classifier: str = CLASSIFIER, conditional: bool = True):
        self.path = str(classifier)
        self.classifier: DigitClassifier = load_classifier(self.path).requires_grad_(False)
        self.conditional = conditional
        self.metrics = (
            {"classifier_acc": "higher", "fd": "lower"}
            if conditional
            else {"classifier_confidence": "higher", "fd": "lower"}
        )

    def features(self, samples: Tensor) -> Tensor:
        """(N, 128) classifier features of samples in [-1, 1]; differentiable in the samples (the
        distillation's 'features' distance trains through it), on the samples' device."""
        return self.classifier.to(samples.device).embed(samples.clamp(-1, 1))

    @torch.no_grad()
    def score(self, samples: Tensor, cond: dict[str, Any]) -> dict[str, float]:
        if tuple(samples.shape[1:]) != (1, 16, 16):
            raise FlowpressError(
                f"digits evaluator: scores 1x16x16 digits, got samples of shape {tuple(samples.shape[1:])}; "
                "name another evaluator in the recipe (or none)"
            )
        images = samples.clamp(-1, 1)
        logits = torch.cat([self.classifier(chunk) for chunk in images.split(256)])
        features = torch.cat([self.classifier.embed(chunk) for chunk in images.split(256)]).numpy()
        fd = frechet_distance(features.astype(np.float64), _real_features(self.path).astype(np.float64))
        if not self.conditional:
            return {"classifier_confidence": float(logits.softmax(1).max(1).values.mean()), "fd": fd}
        return {"classifier_acc": float((logits.argmax(1) == _labels(cond, len(samples))).float().mean()), "fd": fd}


def _labels(cond: dict[str, Any], n: int) -> Tensor:
    """The class each sample was asked for: its class label, or the digit its prompt names."""
    if "class_labels" in cond:
        return cond["class_labels"]
    if "prompts" in cond:
        from examples.digits.pipelines import label_of

        labels = [label_of(p) for p in cond["prompts"]]
        if None in labels:
            bad = cond["prompts"][labels.index(None)]
            raise FlowpressError(f"digits evaluator: prompt {bad!r} names no digit (zero .. nine); use such prompts")
        return torch.tensor(labels)
    raise FlowpressError(
        "digits evaluator: these samples were asked for no class; set the evaluator's option conditional: false"
    )
