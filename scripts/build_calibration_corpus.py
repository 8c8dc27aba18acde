"""Build embedding_service/calibration_data/sentences.txt.gz: real English sentences, one per line.

The accuracy gate (accuracy.py) needs at least 5,000 real sentences that ship
with the service (no downloads at run time). No package we depend on carries
such a corpus, so this one is cut from two public texts and committed:
- the Lee news corpus (Australian news, Lee, Pincombe & Welsh 2005) as shipped
  in gensim 4.4.0's test data (`lee_background.cor`, `lee.cor`, LGPL-2.1 package);
- Python 3.11's own reference documentation (`pydoc_data.topics`, IDLE's help
  page; PSF licence), prose paragraphs only (no code, no grammar).

Run once with a gensim wheel or install at hand:
    python scripts/build_calibration_corpus.py --gensim path/to/gensim-4.4.0-...whl
The output is deterministic (sorted sources, gzip without a timestamp).
"""

from __future__ import annotations

import argparse
import gzip
import html
import importlib.util
import re
import zipfile
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "embedding_service" / "calibration_data" / "sentences.txt.gz"
LEE_FILES = ("lee_background.cor", "lee.cor")


def _sentences(paragraph: str) -> list[str]:
    text = " ".join(paragraph.split())
    parts = re.split(r'(?<=[.!?])\s+(?=["A-Z])', text)
    return [s for s in (p.strip() for p in parts)
            if 25 <= len(s) <= 500 and re.match(r'^["A-Z]', s) and s[-1] in '.!?:"']


def _lee(gensim: str | None) -> list[str]:
    if gensim and gensim.endswith(".whl"):
        with zipfile.ZipFile(gensim) as wheel:
            texts = [wheel.read(f"gensim/test/test_data/{n}") for n in LEE_FILES]
    else:
        spec = importlib.util.find_spec("gensim")  # located, not imported
        root = Path(gensim) if gensim else Path(spec.submodule_search_locations[0])
        texts = [(root / "test" / "test_data" / n).read_bytes() for n in LEE_FILES]
    # One document per line, in Latin-1 (pound signs).
    return [s for raw in texts for line in raw.decode("latin-1").splitlines() for s in _sentences(line)]


def _python_docs() -> list[str]:
    import idlelib
    import pydoc_data.topics

    out = []
    for key in sorted(pydoc_data.topics.topics):
        for para in re.split(r"\n\s*\n", pydoc_data.topics.topics[key]):
            lines = para.split("\n")
            if any(line.startswith("      ") for line in lines) or ">>>" in para or "::=" in para:
                continue  # code, examples, grammar
            out += _sentences(para)
    page = (Path(idlelib.__file__).parent / "help.html").read_text(encoding="utf-8")
    text = html.unescape(re.sub(r"<[^>]+>", " ", page)).replace("¶", " ")
    return out + _sentences(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gensim", help="a gensim 4.4.0 wheel, or its installed package folder")
    args = parser.parse_args()
    sentences = list(dict.fromkeys(_lee(args.gensim) + _python_docs()))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with open(OUT, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as out:
        out.write(("\n".join(sentences) + "\n").encode("utf-8"))
    print(f"{len(sentences)} sentences -> {OUT}")


if __name__ == "__main__":
    main()
