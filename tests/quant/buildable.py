"""Whether lorakit's C kernels (quant/native.py) can be built here; the tests that run them skip where not."""

import shutil

import pytest

from lorakit.quant import native

CAN_BUILD = native.platform_supported() and shutil.which("cc") is not None
needs_kernel = pytest.mark.skipif(not CAN_BUILD, reason="the kernel is built on Linux x86 with AVX2 and a C compiler")
