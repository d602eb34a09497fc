"""Evaluation: zero-shot classification (top-1 and class-balanced), image-text retrieval R@k and few-shot
linear probes on eval suites.

``metrics`` is pure tensor math on features; ``suites`` describes what to measure on which shards;
``evaluate`` encodes a suite with a model and runs its tasks.
"""

from jestclip.eval.evaluate import (
    SuiteFeatures,
    check_labels,
    encode_suite,
    evaluate,
    evaluate_suite,
    flat_metrics,
    format_table,
    gallery_r5,
    is_averaged,
    suite_metrics,
    zero_shot_classifiers,
)
from jestclip.eval.metrics import (
    balanced_accuracy,
    fewshot_linear_probe,
    fewshot_split,
    galleries,
    gallery_recall,
    retrieval_recall,
    top1_accuracy,
    zeroshot_top1,
)
from jestclip.eval.suites import DEFAULT_TEMPLATES, EvalSuite, custom_suite, find_suites, template_problem

__all__ = [
    "DEFAULT_TEMPLATES",
    "EvalSuite",
    "SuiteFeatures",
    "balanced_accuracy",
    "check_labels",
    "custom_suite",
    "encode_suite",
    "evaluate",
    "evaluate_suite",
    "fewshot_linear_probe",
    "fewshot_split",
    "find_suites",
    "flat_metrics",
    "format_table",
    "galleries",
    "gallery_r5",
    "gallery_recall",
    "is_averaged",
    "retrieval_recall",
    "suite_metrics",
    "template_problem",
    "top1_accuracy",
    "zero_shot_classifiers",
    "zeroshot_top1",
]
