"""The NeuronCore hardware table: one place for the limits the plan and the emulator check.

Figures from the public Neuron documentation (see the design notes on NKI): usable SBUF bytes
per partition, PSUM banks, partitions and the Tensor-engine operand limits. The plan
(``plan.py``) budgets against a chip's row; the emulator (``emulator.py``) enforces the same
row, so the two cannot disagree about a limit.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Chip:
    name: str
    sbuf_bytes: int                 # usable SBUF bytes per partition
    partitions: int = 128           # SBUF and PSUM partitions
    psum_banks: int = 8
    psum_bank_bytes: int = 2048     # per partition: 512 fp32
    matmul_k_max: int = 128         # contraction (partitions of both operands)
    matmul_stationary_max: int = 128
    matmul_moving_max: int = 512
    transpose_max: int = 128        # nc_transpose on the Tensor engine: <= 128 x 128


CHIPS = {
    "trn1": Chip("trn1", sbuf_bytes=180_224),   # 192 KiB per partition (inf2 the same)
    "trn2": Chip("trn2", sbuf_bytes=212_984),   # 224 KiB per partition
}
DEFAULT_CHIP = "trn1"

__all__ = ["CHIPS", "Chip", "DEFAULT_CHIP"]
