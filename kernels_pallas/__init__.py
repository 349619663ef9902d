"""Pallas kernels: flash attention and the chunked SSD (docs/interfaces.md), compiled on GPU / TPU and
run in interpret mode on CPU."""

from kernels_pallas.flash_attention import flash_attention
from kernels_pallas.ssd_kernels import ssd_chunked

__all__ = ["flash_attention", "ssd_chunked"]
