"""The recipe's evaluator: 'module.path:Class' imported and built with its options."""

from __future__ import annotations

import importlib
import inspect
import os
import sys

from flowpress.errors import FlowpressError
from flowpress.recipe import EvaluatorSection
from flowpress.validation import Evaluator


def load_evaluator(section: EvaluatorSection, where: str = "evaluator") -> Evaluator | None:
    """The Evaluator the recipe names, or None when it names none."""
    if section.name is None:
        return None
    module_name, _, class_name = section.name.partition(":")
    if not class_name:
        raise FlowpressError(f"{where}.name: {section.name!r} must be 'module.path:Class'")
    if os.getcwd() not in sys.path:  # a recipe's module resolves from the working directory, as under `python -m`
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise FlowpressError(
            f"{where}.name: cannot import {module_name!r} ({err}); run from the repository root or install it"
        ) from None
    cls = getattr(module, class_name, None)
    if cls is None or not inspect.isclass(cls):
        raise FlowpressError(f"{where}.name: {module_name} has no class {class_name!r}")
    try:
        evaluator = cls(**section.options)
    except TypeError as err:
        raise FlowpressError(f"{where}.options: {class_name} does not take them ({err})") from None
    if not isinstance(evaluator, Evaluator):
        raise FlowpressError(f"{where}.name: {section.name} is not an Evaluator (metrics, score(samples, cond))")
    return evaluator
