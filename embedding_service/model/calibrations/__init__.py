"""Calibrations (calibration.py) shipped for packaged models, named by weight fingerprint."""
