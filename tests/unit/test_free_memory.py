"""After a long pass the daemon hands the C heap's free pages back (issue 14: RSS at 1M rules):
what Python frees in the middle of the heap stays in the RSS until then."""

from __future__ import annotations

import sys

import pytest

from blockd.daemon import return_free_memory


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_free_pages_in_the_middle_of_the_heap_are_handed_back() -> None:
    # 4 KiB objects come from malloc's heap (not pymalloc, not mmap); the last one stays, so
    # the freed ones lie below it and free() alone cannot shrink the heap
    blocks = [bytes(4096) for _ in range(50_000)]  # 200 MiB
    keep = bytes(4096)
    del blocks
    before = rss_mib()
    assert return_free_memory()
    after = rss_mib()
    assert before - after > 150, (before, after)
    del keep
