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
from blip2_core.metrics.retrieval import (
    RetrievalGroundTruth,
    RetrievalScores,
    load_retrieval_gt,
    merge_rank_scores,
    recall_at_k,
    rerank_with_itm,
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
    "RetrievalGroundTruth",
    "RetrievalScores",
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
    "load_retrieval_gt",
    "load_vqa_annotations",
    "load_vqa_results",
    "merge_rank_scores",
    "nocaps_scores",
    "normalize_answer",
    "recall_at_k",
    "rerank_with_itm",
    "vqa_accuracy",
]
