"""Triton kernels of saefast, installed as ``saefast.kernels``.

One module per kernel family. Importing this package does not import Triton; import a
family module (``saefast.kernels.topk_encode``...) to get its launchers. Kernels never
import saefast.
"""
