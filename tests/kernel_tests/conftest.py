"""Kernel tests run Triton on CPU through its interpreter.

TRITON_INTERPRET must be set before any ``@triton.jit`` decorator runs, i.e. before
``kernels.bn_matching_triton`` is imported; conftest modules are imported before test modules.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"
