"""The command's allocator policy: a large block freed and allocated again reuses its pages instead of
faulting fresh ones in; LORAKIT_KEEP_FREED_MEMORY=0 leaves glibc's default. Each case runs in a
child process, since the policy is process-wide."""

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="the policy is set through glibc's mallopt")

# 64 MiB allocated, touched and freed, then again: the faults of the second round are printed.
CHILD = """
import resource, sys
from lorakit.process_memory import keep_freed_memory
print(keep_freed_memory())
import torch
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
block = torch.ones(16 * 2**20); del block
before = faults()
block = torch.ones(16 * 2**20); del block
print(faults() - before)
"""


def _second_round_faults(keep: str | None) -> tuple[str, int]:
    env = {k: v for k, v in os.environ.items() if k not in ("LORAKIT_KEEP_FREED_MEMORY", "THP_MEM_ALLOC_ENABLE")}
    if keep is not None:
        env["LORAKIT_KEEP_FREED_MEMORY"] = keep
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, check=True, capture_output=True, text=True).stdout
    changed, faults = out.split()
    return changed, int(faults)


def test_kept_memory_is_reused_without_faulting_its_pages_in_again():
    changed, faults = _second_round_faults(None)
    assert changed == "True"
    assert faults < 1000  # the 64 MiB block would be 16,384 pages of 4 KiB


def test_the_opt_out_leaves_glibcs_default_which_faults_a_large_block_in_again():
    changed, faults = _second_round_faults("0")
    assert changed == "False"
    # glibc maps a block above its mmap threshold (at most 32 MiB) afresh each time: thousands of
    # faults (4 KiB pages), or 32 if the kernel backs it with 2 MiB pages.
    assert faults >= 32


@pytest.mark.skipif(platform.system() != "Linux", reason="reads Linux's /proc/meminfo")
def test_available_memory_is_at_most_the_machines():
    # (Whether it falls as memory is written depends on the host: a VM's /proc/meminfo may hold one
    # value for a while, and other processes free memory meanwhile; the parsing is checked below.)
    from lorakit.process_memory import available_memory_bytes

    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert 0 < available_memory_bytes() <= total


@pytest.mark.parametrize(("text", "expected"), [
    ("MemTotal:       24000000 kB\nMemFree:         1000 kB\nMemAvailable:   12345 kB\n", 12345 * 1024),
    ("MemTotal:       24000000 kB\nMemFree:         1000 kB\n", None),  # a kernel before 3.14 has no line
    ("MemAvailable:   lots kB\n", None),
    ("MemAvailable:\n", None),
])
def test_available_memory_reads_memavailable_and_is_none_where_it_cannot(tmp_path, text, expected):
    from lorakit.process_memory import available_memory_bytes

    meminfo = tmp_path / "meminfo"
    meminfo.write_text(text)
    assert available_memory_bytes(str(meminfo)) == expected
    assert available_memory_bytes(str(tmp_path / "missing")) is None
