"""Pallas kernels: flash attention and the chunked SSD (docs/interfaces.md), compiled on GPU / TPU and
run in interpret mode on CPU."""

from kernels_pallas.flash_attention import flash_attention
from kernels_pallas.ssd_kernels import ssd_chunked

__all__ = ["flash_attention", "ssd_chunked"]

from data import command_check as _command_check  # noqa: E402

_command_check.refuse_library_module(__name__, __path__[0])  # `python -m` on a module that is not a command
