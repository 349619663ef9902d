"""Compressing a trained model's linear layers: quantization and pruning, one layer at a time.

Every function takes weights in the project's kernel layout w float[in, out] (y = x @ w) and returns new weights in
that layout, dequantized to float32 where it quantizes. The calibration-based methods take the inputs' second
moment H = X^T X / n over calibration inputs X [n, in] (any positive scale gives the same result), and AWQ the mean
|x| of each input feature, Wanda its mean square.

    rtn        round to nearest on a min-max grid per output channel or per group of inputs      (grid.py)
    fp8        round to nearest in e4m3 floating point, one scale per channel or group            (fp8.py)
    awq        AWQ (Lin et al. 2024): input scales searched on calibration activations, then RTN   (awq.py)
               or GPTQ
    gptq       GPTQ (Frantar et al. 2022): quantize input by input, the error spread over the rest  (gptq.py)
    sparsegpt  SparseGPT (Frantar and Alistarh 2023): the same OBS updates, pruning instead       (sparsegpt.py)
    wanda      Wanda (Sun et al. 2023): prune by |w| x the input feature's norm, per output       (wanda.py)
"""

from experiments.compression.awq import awq, search as awq_search
from experiments.compression.fp8 import fp8
from experiments.compression.grid import rtn
from experiments.compression.gptq import gptq
from experiments.compression.sparsegpt import sparsegpt
from experiments.compression.wanda import wanda

__all__ = ["awq", "awq_search", "fp8", "gptq", "rtn", "sparsegpt", "wanda"]
