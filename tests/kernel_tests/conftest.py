"""Kernel tests run Triton on CPU through its interpreter.

TRITON_INTERPRET must be set before any ``@triton.jit`` decorator runs, i.e. before
``kernels.bn_matching_triton`` is imported: tests/conftest.py sets it to 1 when it is imported
(before any test folder's conftest or module) unless the GPU tier (``-m gpu``, compiled kernels) is
selected; this keeps it for a run started elsewhere.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
