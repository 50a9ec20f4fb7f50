"""Building and loading lorakit's C kernels (native.py), with the 4-bit one as the example: a build
cut short, an unwritable cache, a damaged library on disk, one another account could write."""

import os
import subprocess
import sys

from lorakit.quant import int4_float32, native
from tests.quant.buildable import needs_kernel


@needs_kernel
def test_a_build_cut_short_leaves_nothing_that_would_be_loaded(tmp_path, monkeypatch):
    fake = tmp_path / "cc"  # writes half a library, then fails, as a compiler killed mid-write would
    fake.write_text('#!/bin/sh\nfor a; do out=$a; done\nprintf "\\177ELF half" > "$out"\nexit 1\n')
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    directory = tmp_path / "kernels"
    assert native.build(int4_float32.SOURCE, directory, "int4_float32-test-") is None
    assert list(directory.iterdir()) == []
    monkeypatch.delenv("CC")
    built = native.build(int4_float32.SOURCE, directory, "int4_float32-test-")
    assert list(directory.iterdir()) == [built] and native.private(built)
    assert native.verified(directory, "int4_float32-test-") == built
    in_the_way = tmp_path / "not-a-directory"  # a cache that cannot be written (even by root)
    in_the_way.write_text("")
    assert native.build(int4_float32.SOURCE, in_the_way / "kernels", "int4_float32-test-") is None


@needs_kernel
def test_a_damaged_library_is_rebuilt_and_one_others_could_write_is_not_loaded(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    int4_float32._library.cache_clear()
    try:
        assert int4_float32._library() is not None  # built into the new cache
        (built,) = (tmp_path / "kernels").iterdir()
        damaged = built.with_suffix(".damaged")
        damaged.write_bytes(built.read_bytes()[:1000])  # as a power cut can leave it: the name on disk, the data not
        os.replace(damaged, built)  # a new file: the pages this process has loaded stay as they are
        # In a new process: this one has the library loaded under that name, which dlopen would reuse.
        probe = ("import torch; from lorakit.quant.linear import QuantLinear; "
                 "layer = QuantLinear.from_linear(torch.nn.Linear(256, 16), 4, 32).eval(); "
                 "print(type(layer.kernel_weight(torch.device('cpu'), 1)).__name__)")
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                              env={**os.environ, "LORAKIT_CACHE": str(tmp_path)})
        assert done.stdout.strip() == "Int4Gemv"  # loading it would have crashed that process (SIGBUS)
        (rebuilt,) = (tmp_path / "kernels").iterdir()  # the damaged one removed
        assert native.digest(rebuilt) == rebuilt.stem.rpartition("-")[2]
        os.chmod(rebuilt, 0o666)
        int4_float32._library.cache_clear()
        assert int4_float32._library() is None  # the int4 kernel takes their rows instead
    finally:
        int4_float32._library.cache_clear()
