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
def test_available_memory_is_at_most_the_machine_s_and_falls_when_a_block_is_written():
    from lorakit.process_memory import available_memory_bytes

    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    before = available_memory_bytes()
    assert 0 < before <= total
    block = b"\x01" * (256 << 20)  # every page written
    assert available_memory_bytes() < before
    del block
