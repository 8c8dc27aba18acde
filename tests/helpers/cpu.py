"""This machine's CPU as Linux reports it: the outcomes of precisions that depend on its units."""

from __future__ import annotations

from pathlib import Path

CPU_FLAGS = set(Path("/proc/cpuinfo").read_text().split())
CPU_HAS_BF16 = bool({"avx512_bf16", "amx_bf16"} & CPU_FLAGS)  # OpenVINO's bf16 needs them; torch's runs slow without
CPU_HAS_VNNI = bool({"avx512_vnni", "avx_vnni", "amx_int8"} & CPU_FLAGS)  # int8 dot products
