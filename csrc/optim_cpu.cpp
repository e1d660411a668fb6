// CPU backend of the fused optimizer ops: every tensor of every list is laid end
// to end in one virtual index space of cache lines (each tensor padded to whole
// lines), and a single at::parallel_for splits that space, so a group of many
// small tensors is shared across threads as well as one large tensor is, and no
// two threads ever write the same cache line. Each piece runs the rule with
// at::vec::Vectorized over the body and one masked load/store for the tail.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <vector>

#include "optim_ops.h"

namespace densepipe::optim {

template <typename T>
struct Lane<at::vec::Vectorized<T>> {
  using V = at::vec::Vectorized<T>;
  static V sqrt(V x) { return x.sqrt(); }
  static V div(V a, V b) { return a / b; }
  static V neg(V x) { return x.neg(); }
  static V max(V a, V b) { return at::vec::maximum(a, b); }  // NaN propagates
  static V min(V a, V b) { return at::vec::minimum(a, b); }
  static V abs(V x) { return x.abs(); }
  static V pow(V x, V p) { return x.pow(p); }
};

namespace cpu {

namespace {

template <typename T>
using Vec = at::vec::Vectorized<T>;

constexpr int64_t kLineBytes = 64;              // one cache line
// Per list and share: below this a step runs on one thread, since waking others costs more
// than it saves (and stalls when cores are shared). Small because in training the step finds
// its tensors out of cache, the products in between having evicted them: a 64-256-128-10 MLP's
// Adam step (51K parameters, 203 KB a list) took 53-62 us a training step on one thread and
// 31-35 us split in 64 KB shares on two; with the tensors in cache, 30 us on one thread.
constexpr int64_t kMinShareBytes = 64 * 1024;
constexpr int64_t kSharesPerThread = 8;         // enough for a busy thread's work to move,
                                                // few enough to keep long sequential streams
constexpr int64_t kPrefetchLines = 16;          // lines of the next tensor asked for ahead
constexpr int64_t kNormBlockLines = 256;        // one partial sum of the norm; fixed, so the
                                                // result does not depend on the thread count

// Runs fn(share) for shares [0, n) of the work in one at::parallel_for region whose
// threads each take the next share as they finish one: a thread that starts late
// or runs slow (a core shared with data-loader workers or other processes) leaves
// its part to the others instead of holding a fixed half of the range.
template <typename Fn>
void parallel_shares(int64_t n, const Fn& fn) {
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), n);
  if (threads <= 1 || at::in_parallel_region()) {
    for (int64_t t = 0; t < n; ++t) fn(t);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t t; (t = next.fetch_add(1, std::memory_order_relaxed)) < n;) fn(t);
  });
}

// N parallel lists of one dtype, as pointers and the cache-line index space.
template <typename T, int N>
struct Flat {
  static constexpr int64_t kLineElems = kLineBytes / sizeof(T);
  std::vector<std::array<T*, N>> ptr;
  std::vector<int64_t> numel;
  std::vector<int64_t> first_line;  // first line of each tensor; one extra entry: the total

  explicit Flat(const Lists& lists) {
    const size_t n = lists[0].size();
    ptr.resize(n);
    numel.resize(n);
    first_line.resize(n + 1);
    first_line[0] = 0;
    for (size_t t = 0; t < n; ++t) {
      for (int k = 0; k < N; ++k) ptr[t][k] = static_cast<T*>(lists[k][t].data_ptr());
      numel[t] = lists[0][t].numel();
      first_line[t + 1] = first_line[t] + (numel[t] + kLineElems - 1) / kLineElems;
    }
  }
  int64_t lines() const { return first_line.back(); }
  // Asks for the first lines of tensor t in every list while the one before it runs:
  // each tensor starts a stream the hardware prefetcher has not seen yet, and with many
  // small tensors those cold starts set the pace (about 10% of a 200-tensor step).
  void prefetch_head(size_t t) const {
    const int64_t head = std::min<int64_t>(numel[t], kPrefetchLines * kLineElems);
    for (int k = 0; k < N; ++k) {
      for (int64_t i = 0; i < head; i += kLineElems) __builtin_prefetch(ptr[t][k] + i, k != 1, 3);
    }
  }

  // fn(tensor, begin, end) for each tensor's element range inside lines [l0, l1).
  template <typename Fn>
  void for_each_piece(int64_t l0, int64_t l1, Fn&& fn) const {
    size_t t = std::upper_bound(first_line.begin(), first_line.end(), l0) - first_line.begin() - 1;
    for (int64_t l = l0; l < l1; ++t) {
      const int64_t stop = std::min(l1, first_line[t + 1]);
      if (stop > l) {
        fn(t, (l - first_line[t]) * kLineElems,
           std::min(numel[t], (stop - first_line[t]) * kLineElems));
      }
      l = std::max(l, stop);
    }
  }
};

// Runs the rule over n elements from p[k]: full vectors, then one masked tail.
template <typename T, typename Rule>
inline void run_piece(const Rule& rule, std::array<T*, Rule::kLists> p, int64_t n) {
  using V = Vec<T>;
  constexpr int N = Rule::kLists;
  auto step = [&](int64_t i, int64_t count) {
    V x[N];
    for (int k = 0; k < N; ++k) x[k] = V::loadu(p[k] + i, count);
    rule(x);
    for (int k = 0; k < N; ++k) {
      if (k != 1 || N == 1) x[k].store(p[k] + i, count);  // list 1 is the read-only grad
    }
  };
  int64_t i = 0;
  for (; i + V::size() <= n; i += V::size()) step(i, V::size());
  if (i < n) step(i, n - i);
}

template <typename T, typename Rule>
void run_rule(const Lists& lists, const Rule& rule) {
  if constexpr (requires { rule.skip(); }) {
    if (rule.skip()) return;
  }
  const Flat<T, Rule::kLists> flat(lists);
  const int64_t share_lines = std::max(kMinShareBytes / kLineBytes,
                                       flat.lines() / (kSharesPerThread * at::get_num_threads()) + 1);
  parallel_shares((flat.lines() + share_lines - 1) / share_lines, [&](int64_t share) {
    const int64_t l0 = share * share_lines;
    flat.for_each_piece(l0, std::min(flat.lines(), l0 + share_lines), [&](size_t t, int64_t begin, int64_t end) {
      if (t + 1 < flat.ptr.size()) flat.prefetch_head(t + 1);
      std::array<T*, Rule::kLists> p = flat.ptr[t];
      for (auto& q : p) q += begin;
      run_piece<T>(rule, p, end - begin);
    });
  });
}

// Combines the norm terms of n elements into acc (4 accumulators hide latency).
template <NormKind K, typename T>
inline void norm_piece(const T* x, int64_t n, T p, Vec<T>* acc) {
  using V = Vec<T>;
  const V id(norm_identity<K, T>());
  int64_t i = 0;
  for (; i + 4 * V::size() <= n; i += 4 * V::size()) {
    for (int j = 0; j < 4; ++j) {
      acc[j] = norm_combine<K>(acc[j], norm_term<K>(V::loadu(x + i + j * V::size()), p));
    }
  }
  for (; i + V::size() <= n; i += V::size()) acc[0] = norm_combine<K>(acc[0], norm_term<K>(V::loadu(x + i), p));
  if (i < n) {  // lanes past the end hold the identity, which changes nothing
    const V tail = V::set(id, norm_term<K>(V::loadu(x + i, n - i), p), n - i);
    acc[0] = norm_combine<K>(acc[0], tail);
  }
}

template <NormKind K, typename T>
double norm_flat(const Lists& grads, double norm_type) {
  using V = Vec<T>;
  const Flat<T, 1> flat(grads);
  const int64_t blocks = (flat.lines() + kNormBlockLines - 1) / kNormBlockLines;
  std::vector<double> partial(blocks);
  const T p = static_cast<T>(norm_type);
  parallel_shares(blocks, [&](int64_t b) {
    V acc[4];
    for (auto& a : acc) a = V(norm_identity<K, T>());
    flat.for_each_piece(b * kNormBlockLines, std::min(flat.lines(), (b + 1) * kNormBlockLines),
                        [&](size_t t, int64_t begin, int64_t end) {
                          norm_piece<K, T>(flat.ptr[t][0] + begin, end - begin, p, acc);
                        });
    T lanes[4][V::size()];
    for (int j = 0; j < 4; ++j) acc[j].store(lanes[j]);
    double total = norm_identity<K, double>();
    for (int j = 0; j < 4; ++j) {
      for (int l = 0; l < V::size(); ++l) total = norm_combine<K>(total, double(lanes[j][l]));
    }
    partial[b] = total;
  });
  double total = norm_identity<K, double>();
  for (double v : partial) total = norm_combine<K>(total, v);
  return norm_finish<K>(total, norm_type);
}

}  // namespace

struct CpuBackend {
  template <typename MakeRule>
  static void apply(const Lists& lists, MakeRule make_rule) {
    if (lists.empty()) return;
    AT_DISPATCH_FLOATING_TYPES(lists[0][0].scalar_type(), "densepipe_optim_cpu", [&] {
      run_rule<scalar_t>(lists, make_rule(Tag<scalar_t>{}));
    });
  }

  static at::Tensor norm(const Lists& grads, NormKind kind, double norm_type) {
    double total = 0;
    AT_DISPATCH_FLOATING_TYPES(grads[0][0].scalar_type(), "densepipe_grad_norm_cpu", [&] {
      dispatch_norm(kind, [&](auto k) { total = norm_flat<k.value, scalar_t>(grads, norm_type); });
    });
    return at::scalar_tensor(total, grads[0][0].options());
  }
};

}  // namespace cpu

TORCH_LIBRARY_IMPL(densepipe, CPU, m) { register_optim_ops<cpu::CpuBackend>(m); }
// A sparse gradient dispatches here; the checks then refuse it with a clear message.
TORCH_LIBRARY_IMPL(densepipe, SparseCPU, m) { register_optim_ops<cpu::CpuBackend>(m); }

}  // namespace densepipe::optim
