"""The packaged corpus of real sentences (accuracy.py; built by scripts/build_calibration_corpus.py)."""
