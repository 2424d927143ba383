// Work items shared among the threads of one parallel region as they come free, for the kernels'
// outer loops (their items are independent: each writes its own part of the output, so which
// thread runs an item never changes a bit).
//
// at::parallel_for gives each thread a fixed, equal share of the range up front. When one thread
// runs slower than the other (a shared machine's second vCPU, a sibling hyperthread under load,
// items of unequal cost such as rows with more outlier channels), the faster one finishes early
// and waits at the region's end. Here each thread takes the next `chunk` items from a shared
// counter until none are left, so the threads finish within about one chunk of each other.

#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace ouromamba_parallel {

// Hands out [0, n) in runs of `chunk` items: next(begin, end) gives the calling thread its next
// run and returns false when the range is used up.
class Items {
 public:
  Items(int64_t n, int64_t chunk) : n_(n), chunk_(std::max<int64_t>(1, chunk)) {}
  bool next(int64_t& begin, int64_t& end) {
    begin = next_.fetch_add(chunk_, std::memory_order_relaxed);
    if (begin >= n_) return false;
    end = std::min(n_, begin + chunk_);
    return true;
  }

 private:
  const int64_t n_, chunk_;
  std::atomic<int64_t> next_{0};
};

// Runs body(i, next) over the items of the calling thread's runs, in order, where next is the
// item this thread runs after i, or -1 after its last. A run's last item claims the thread's next
// run before it runs, so a kernel that prefetches the next item's data while it works on one
// (the scan's forward) keeps doing so from one run into the next instead of starting every run
// on cold data.
template <class Body>
void for_each_with_next(Items& items, const Body& body) {
  int64_t begin, end, nbegin = 0, nend = 0;
  bool have = items.next(begin, end);
  while (have) {
    bool more = false;
    for (int64_t i = begin; i < end; ++i) {
      if (i + 1 == end) more = items.next(nbegin, nend);
      body(i, i + 1 < end ? i + 1 : (more ? nbegin : int64_t(-1)));
    }
    begin = nbegin;
    end = nend;
    have = more;
  }
}

// Runs body(items) once on each thread of a parallel region (body: set up per-thread scratch, then
// `while (items.next(b, e))` over its runs). One thread, given the whole range as a single run (as
// a plain loop over it: a kernel that prefetches the next item within its run keeps doing so), when
// there is a single run, a single thread, or when already inside a parallel region.
template <class Body>
void parallel_items(int64_t n, int64_t chunk, const Body& body) {
  if (n <= 0) return;
  chunk = std::max<int64_t>(1, chunk);
  const int64_t runs = (n + chunk - 1) / chunk;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), runs);
  if (threads <= 1 || at::in_parallel_region()) {
    Items items(n, n);
    body(items);
    return;
  }
  Items items(n, chunk);
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) { body(items); });
}

}  // namespace ouromamba_parallel
