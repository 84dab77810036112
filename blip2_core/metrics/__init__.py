"""Evaluation metrics for the downstream tasks: VQA accuracy, captioning scores, retrieval recall@K."""

from blip2_core.metrics.caption import (
    CaptionScores,
    NoCapsScores,
    caption_scores,
    evaluate_caption_files,
    evaluate_nocaps_files,
    load_coco_captions,
    load_coco_results,
    load_nocaps,
    nocaps_scores,
)
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
    "CaptionScores",
    "NoCapsScores",
    "VQAAnnotation",
    "VQAScores",
    "caption_scores",
    "evaluate_caption_files",
    "evaluate_gqa_files",
    "evaluate_nocaps_files",
    "evaluate_vqa_files",
    "load_coco_captions",
    "load_coco_results",
    "load_gqa",
    "load_nocaps",
    "load_vqa_annotations",
    "load_vqa_results",
    "nocaps_scores",
    "normalize_answer",
    "vqa_accuracy",
]
