"""DigitsEvaluator: how recognisable a set of 16x16 digit samples is, by the committed classifier.

classifier_acc: the fraction of samples the classifier reads as the class they were drawn for;
fd: the Frechet distance of the classifier's features to those of all 1,797 real digits."""

from __future__ import annotations

from functools import cache

import numpy as np
import torch
from torch import Tensor

from examples.digits.classifier import DigitClassifier, load_classifier
from examples.digits.data import load_digits
from flowpress.engines import frechet_distance
from flowpress.errors import FlowpressError

CLASSIFIER = "examples/digits/checkpoints/digits-classifier"


@cache
def _real_features(classifier_path: str) -> np.ndarray:
    """Classifier features of every real digit (the Frechet distance's reference), once per process."""
    classifier = load_classifier(classifier_path)
    with torch.no_grad():
        return torch.cat([classifier.embed(chunk) for chunk in load_digits("all").images.split(256)]).numpy()


class DigitsEvaluator:
    """flowpress.engines.Evaluator for class-conditional digit samples."""

    metrics = {"classifier_acc": "higher", "fd": "lower"}

    def __init__(self, classifier: str = CLASSIFIER):
        self.path = str(classifier)
        self.classifier: DigitClassifier = load_classifier(self.path).requires_grad_(False)

    def features(self, samples: Tensor) -> Tensor:
        """(N, 128) classifier features of samples in [-1, 1]; differentiable in the samples (the
        distillation's 'features' distance trains through it), on the samples' device."""
        return self.classifier.to(samples.device).embed(samples.clamp(-1, 1))

    @torch.no_grad()
    def score(self, samples: Tensor, cond: dict[str, Tensor]) -> dict[str, float]:
        if "class_labels" not in cond:
            raise FlowpressError("digits evaluator: samples need class labels (a class-conditional model)")
        if tuple(samples.shape[1:]) != (1, 16, 16):
            raise FlowpressError(
                f"digits evaluator: scores 1x16x16 digits, got samples of shape {tuple(samples.shape[1:])}; "
                "name another evaluator in the recipe (or none)"
            )
        labels = cond["class_labels"]
        images = samples.clamp(-1, 1)
        logits = torch.cat([self.classifier(chunk) for chunk in images.split(256)])
        features = torch.cat([self.classifier.embed(chunk) for chunk in images.split(256)]).numpy()
        return {
            "classifier_acc": float((logits.argmax(1) == labels).float().mean()),
            "fd": frechet_distance(features.astype(np.float64), _real_features(self.path).astype(np.float64)),
        }
