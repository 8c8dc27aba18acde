"""The classification kind in-process: a replica built through its constructor as Serve builds it, its scores against
transformers' own text-classification pipeline (softmax for a single-label model, sigmoid for a multi-label one,
pairs, raw logits, mixed shards, REJECT), and the router's Tokenize/Detokenize against the model's own tokenizer."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from embedding_client.v1 import embedding_pb2 as pb
from embedding_service.config import Limits, ModelSettings
from embedding_service.model.classify import ClassifyModel
from embedding_service.model.watchdog import Placement
from embedding_service.router import convert
from embedding_service.router.token_lengths import TokenLengths
from embedding_service.router.tokenizing import ModelTokenizer, detokenize_inputs
from embedding_service.router.validation import build_classify_job
from embedding_service.wire.messages import ClassifyOptions, ShardRequest
from embedding_service.wire.reasons import Reason, ServiceError
from tests.helpers.classifiers import (
    CLASSIFIER_LABELS,
    CLASSIFIER_MAX_SEQ,
    build_tiny_classifier,
    pipeline_scores,
    text_classification,
)
from tests.helpers.recycler import RecyclerHandle

TEXTS = ["the match ended in a draw", "rain all week", "a new exhibition of paintings opens", "x"]
PAIRS = [("a man plays guitar", "someone makes music"), ("the sky is blue", "it is raining")]


@pytest.fixture(scope="module")
def single_label_dir(tmp_path_factory):
    return build_tiny_classifier(tmp_path_factory.mktemp("single"), multi_label=False, name="single")


def _serve(folder, run):
    settings = ModelSettings(name="c", kind="classify", path=str(folder), device="cpu", max_batch_size=64)

    async def main():
        replica = ClassifyModel(settings, RecyclerHandle(), heartbeat_s=3600, placement=Placement("node-1", "r-1"))
        try:
            return replica, await run(replica)
        finally:
            await replica.close()

    return asyncio.run(main())


@pytest.mark.parametrize("multi_label", [True, False], ids=["sigmoid", "softmax"])
def test_scores_equal_the_pipeline_and_a_mixed_shard_of_texts_and_pairs_runs(classifier_dir, single_label_dir,
                                                                           multi_label):
    folder = classifier_dir if multi_label else single_label_dir
    inputs = [*TEXTS, *PAIRS]

    async def run(replica):
        return await asyncio.gather(replica.compute(ShardRequest(inputs, ClassifyOptions())),
                                    replica.compute(ShardRequest(TEXTS, ClassifyOptions(raw_scores=True))))

    replica, (scored, raw) = _serve(folder, run)
    assert replica.info.kind == "classify" and replica.info.labels == CLASSIFIER_LABELS
    assert replica.info.activation == ("sigmoid" if multi_label else "softmax")
    assert replica.info.dimension == len(CLASSIFIER_LABELS) and replica.info.max_sequence_length == CLASSIFIER_MAX_SEQ
    pipe = text_classification(folder)
    assert np.abs(scored.vectors - pipeline_scores(pipe, inputs)).max() < 1e-5
    assert np.abs(raw.vectors - pipeline_scores(pipe, TEXTS, raw=True)).max() < 1e-5
    tokenizer = pipe.tokenizer
    counts = [len(tokenizer(*x)["input_ids"]) if isinstance(x, tuple) else len(tokenizer(x)["input_ids"])
              for x in inputs]
    assert scored.token_counts.tolist() == counts


def test_long_inputs_are_cut_as_the_tokenizer_cuts_them_or_refused_with_reject(classifier_dir):
    long = "word " * 200
    inputs = [long, (long, "short"), "short"]

    async def run(replica):
        return (await replica.compute(ShardRequest(inputs, ClassifyOptions())),
                await replica.compute(ShardRequest(inputs, ClassifyOptions(truncation="reject"))))

    _, (cut, rejected) = _serve(classifier_dir, run)
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(classifier_dir))
    model = AutoModelForSequenceClassification.from_pretrained(str(classifier_dir)).eval()
    expected = []
    for x in inputs:
        pair = x if isinstance(x, tuple) else (x, None)
        with torch.inference_mode():
            logits = model(**tokenizer(*pair, truncation=True, max_length=CLASSIFIER_MAX_SEQ,
                                       return_tensors="pt")).logits[0].numpy()
        expected.append(1 / (1 + np.exp(-logits)))
    assert np.abs(cut.vectors - np.array(expected)).max() < 1e-5
    assert cut.token_counts.tolist() == [CLASSIFIER_MAX_SEQ, CLASSIFIER_MAX_SEQ, 3]
    assert rejected.vectors is None and rejected.too_long == [0, 1] and rejected.token_counts[0] > CLASSIFIER_MAX_SEQ


def test_top_k_is_bounded_by_the_labels_and_the_published_limit():
    from embedding_service.wire.messages import ModelInfo

    info = ModelInfo(name="c", dimension=5, max_sequence_length=8, prompts={}, device="cpu", backend="torch",
                     vocab_size=10, source="t", kind="classify", labels=CLASSIFIER_LABELS, activation="sigmoid")
    request = pb.ClassifyRequest(inputs=[pb.ClassifyInput(text="a")])
    assert build_classify_job(request, info, Limits()).top == 5
    assert build_classify_job(request, info, Limits(max_labels_per_result=3)).top == 3
    for top_k, limits in ((0, Limits()), (6, Limits()), (4, Limits(max_labels_per_result=3))):
        with pytest.raises(ServiceError) as caught:
            build_classify_job(pb.ClassifyRequest(inputs=[pb.ClassifyInput(text="a")], top_k=top_k), info, limits)
        assert caught.value.reason == Reason.INVALID_TOP and caught.value.metadata["field"] == "top_k"
    with pytest.raises(ServiceError) as caught:
        build_classify_job(pb.ClassifyRequest(inputs=[pb.ClassifyInput(text="a", text_pair="b" * 11)]), info,
                           Limits(max_chars_per_input=10))
    assert caught.value.reason == Reason.INPUT_TOO_LARGE and caught.value.metadata["field"] == "text_pair"
    scores = np.array([[0.1, 0.9, 0.5, 0.9, 0.2]], dtype=np.float32)
    reply = pb.ClassifyResponse()
    convert.fill_classifications(reply.classifications, [7], scores, np.array([4]), CLASSIFIER_LABELS, 3)
    got = reply.classifications[0]
    assert got.index == 7 and got.tokens == 4
    assert [(s.label, s.label_id) for s in got.labels] == [("politics", 1), ("arts", 3), ("science", 2)]


def test_tokenize_and_detokenize_equal_the_models_own_tokenizer(classifier_dir):
    from transformers import AutoTokenizer

    from embedding_service.wire.messages import ModelInfo

    hf = AutoTokenizer.from_pretrained(str(classifier_dir))
    info = ModelInfo(name="c", dimension=5, max_sequence_length=8, prompts={}, device="cpu", backend="torch",
                     vocab_size=hf.vocab_size, source="t", tokenizer_json=hf.backend_tokenizer.to_str(),
                     decode_cleanup=bool(hf.clean_up_tokenization_spaces))
    tokenizer = ModelTokenizer(TokenLengths(info.tokenizer_json, info.max_sequence_length).tokenizer,
                               info.decode_cleanup)
    texts = ["Hello, world! Isn't it fine?", "naïve café, 日本 ok.", "word " * 100]
    for special in (True, False):
        got = tokenizer.tokenize(texts, special, tokens=True, offsets=True)
        for text, item in zip(texts, got):
            own = hf(text, add_special_tokens=special, return_offsets_mapping=True)
            assert list(item.ids) == own["input_ids"]  # untruncated: the 100-word text has over 100 ids
            assert list(item.tokens) == hf.convert_ids_to_tokens(own["input_ids"])
            assert list(zip(item.starts, item.ends)) == [tuple(o) for o in own["offset_mapping"]]
            assert list(item.special) == [i in hf.all_special_ids for i in own["input_ids"]]
    ids = [hf(t)["input_ids"] for t in texts]
    for skip in (True, False):
        assert tokenizer.detokenize(ids, skip) == [hf.decode(i, skip_special_tokens=skip) for i in ids]
    request = pb.DetokenizeRequest(inputs=[pb.TokenIds(ids=[1, 2]), pb.TokenIds(ids=[tokenizer.vocab_size])])
    with pytest.raises(ServiceError) as caught:
        detokenize_inputs(request, Limits(), tokenizer.vocab_size, "c")
    assert caught.value.reason == Reason.TOKEN_ID_OUT_OF_RANGE and caught.value.metadata["index"] == "1"
    with pytest.raises(ServiceError) as caught:
        detokenize_inputs(request, Limits(max_token_ids_per_detokenize=2), tokenizer.vocab_size, "c")
    assert caught.value.reason == Reason.INPUT_TOO_LARGE
