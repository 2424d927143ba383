"""of.tune_malloc: glibc keeps freed tensors' memory, so writing a new tensor of the same size stops
faulting its pages in (each case in a fresh process: the setting is process-wide)."""

import subprocess
import sys

import pytest

import ouromamba_fx as of
from ouromamba_fx import cpu_malloc

GLIBC = cpu_malloc._glibc() is not None

# Minor page faults over 20 rounds of a lowered Vim-S mixer's output sizes at batch 16 (in_proj's
# 19 MB, the convs' and scans' 10 MB, out_proj's 5 MB), written whole and freed with overlapping
# lifetimes.
CHILD = """
import resource, sys, torch
import ouromamba_fx as of
if sys.argv[1] == "tuned":
    print("set", of.tune_malloc())
else:  # glibc's starting thresholds, held (its own adjustment of them depends on what ran before)
    print("set", of.tune_malloc(128 * 1024, 128 * 1024))
MB = 1 << 18  # float32 elements per MB
def mixer():
    a = torch.empty(19 * MB).fill_(1.0)
    b = torch.empty(10 * MB).fill_(1.0)
    c = torch.empty(10 * MB).fill_(1.0)
    del a
    d = torch.empty(10 * MB).fill_(1.0)
    e = torch.empty(5 * MB).fill_(1.0)
    del b, c, d, e
mixer()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    mixer()
print("faults", resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
PAGES = 20 * 54 * (1 << 20) // 4096  # every 4 KB page written in the 20 rounds


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, timeout=300,
                         check=True).stdout
    return int(out.split("faults")[-1])


@pytest.mark.skipif(not GLIBC, reason="tune_malloc sets glibc's malloc; this C library is not glibc")
def test_tuned_malloc_stops_refaulting_freed_tensors():
    start, tuned = _faults("start"), _faults("tuned")
    # with glibc's starting thresholds each chunk is mapped anew and unmapped when freed, so every
    # round faults (and the kernel zeroes) its pages again; tuned, the freed chunks stay in the heap
    # and the next tensors reuse them
    assert start > PAGES // 2
    assert tuned < PAGES // 20


@pytest.mark.skipif(not GLIBC, reason="tune_malloc sets glibc's malloc; this C library is not glibc")
def test_tune_malloc_reports_what_it_set():
    out = subprocess.run([sys.executable, "-c", "import ouromamba_fx as of; print(of.tune_malloc(1 << 20, 1 << 30))"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    assert "'M_MMAP_THRESHOLD': 1048576" in out and "'M_TRIM_THRESHOLD': 1073741824" in out


@pytest.mark.parametrize("kw", [dict(mmap_threshold=(32 << 20) + 1), dict(mmap_threshold=-1),
                                dict(trim_threshold=2**31), dict(trim_threshold=-5)])
def test_tune_malloc_rejects_values_glibc_cannot_take(kw):
    with pytest.raises(ValueError, match="tune_malloc"):
        of.tune_malloc(**kw)


def test_tune_malloc_elsewhere_warns_and_changes_nothing(monkeypatch):
    monkeypatch.setattr(cpu_malloc, "_glibc", lambda: None)
    with pytest.warns(UserWarning, match="not glibc"):
        assert of.tune_malloc() == {}
