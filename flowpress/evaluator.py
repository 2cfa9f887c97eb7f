"""The recipe's evaluator: 'module.path:Class' imported and built with its options."""

from __future__ import annotations

import inspect

from flowpress.errors import FlowpressError
from flowpress.plugins import import_named
from flowpress.recipe import EvaluatorSection
from flowpress.validation import Evaluator


def load_evaluator(section: EvaluatorSection, where: str = "evaluator") -> Evaluator | None:
    """The Evaluator the recipe names, or None when it names none."""
    if section.name is None:
        return None
    cls = import_named(section.name, f"{where}.name", "Class")
    class_name = section.name.partition(":")[2]
    if not inspect.isclass(cls):
        raise FlowpressError(f"{where}.name: {section.name} is not a class")
    try:
        evaluator = cls(**section.options)
    except TypeError as err:
        raise FlowpressError(f"{where}.options: {class_name} does not take them ({err})") from None
    if not isinstance(evaluator, Evaluator):
        raise FlowpressError(f"{where}.name: {section.name} is not an Evaluator (metrics, score(samples, cond))")
    return evaluator
