"""Evaluation metrics for the downstream tasks: VQA accuracy, captioning scores, retrieval recall@K."""

from blip2_core.metrics.vqa import (
    VQAAnnotation,
    VQAScores,
    evaluate_gqa_files,
    evaluate_vqa_files,
    load_gqa,
    load_vqa_annotations,
    load_vqa_results,
    normalize_answer,
    vqa_accuracy,
)

__all__ = [
    "VQAAnnotation",
    "VQAScores",
    "evaluate_gqa_files",
    "evaluate_vqa_files",
    "load_gqa",
    "load_vqa_annotations",
    "load_vqa_results",
    "normalize_answer",
    "vqa_accuracy",
]
