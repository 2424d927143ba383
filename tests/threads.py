"""Checks that a kernel's outputs do not depend on how many threads run it."""

import torch


def assert_same_bits_at_thread_counts(run, counts=(2, 3, 3)):
    """``run()`` returns a list of tensors; at each of ``counts`` torch threads (3 twice: the
    threads then take their work items in another order) they must equal the one-thread run's bit
    for bit. Restores the thread count."""
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        ref = run()
        for threads in counts:
            torch.set_num_threads(threads)
            got = run()
            assert len(got) == len(ref)
            for i, (x, e) in enumerate(zip(got, ref)):
                assert torch.equal(x, e), f"output {i} differs at {threads} threads"
    finally:
        torch.set_num_threads(old)
