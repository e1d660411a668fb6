// One epoch of training steps for a classifier that is one chain of fused dense layers under
// softmax cross-entropy from logits: the tabular MLP classifier, the model most runs train.
//
// It makes, step after step, the calls the Python loop makes for that model (train/loop.py's
// steps with train/direct.py's _ChainPlan): the batch's gather, dense_chain_forward,
// softmax_cross_entropy, dense_chain_backward, the gradient norms and the step's log row, with
// the same arguments in the same order, so on one thread training is the same bit for bit. What
// it leaves out is the Python between those calls: a tenth to a quarter of a small MLP's step on
// the CPU.
//
// With several threads, a step of at least 2 * kMinBlockRows rows is split into blocks of rows,
// one per thread, each running those calls on its rows alone, on one core; the blocks' parameter
// gradients are then summed in block order. A small MLP's products split poorly inside each call
// on BLAS (a 128-row step's on 2 threads ran at about 1.3x one thread's speed), and a step's
// dozen parallel regions each cost a fork and a join; blocks need one. Training the benchmark's
// MLP (64-256-128-10, batch 128, 2 threads) ran 1.10x as fast (median of 30 alternating fits).
// With the products on densepipe's AVX-512 kernel (gemm_avx512.cpp), which splits a product by
// column panels at little cost, blocks still ran 1.04x (digits) and 1.05x (synthetic set) as fast
// as unsplit steps (medians of 5 and 3 alternating rounds of fits in fresh processes: a small
// gain, near this machine's noise). The sums' rounding then depends on the thread count: results
// stay the same from run to run for a given thread count, and agree with the one-thread results
// to rounding.
//
// The optimizer's update (with clipping and constraints) stays in Python: a callable, called once per
// step after the gradients are set, so every optimizer and its state work as they do elsewhere.
#include "chain_epoch.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <string>
#include <tuple>
#include <vector>

namespace densepipe {

namespace {

using Tensor = at::Tensor;
using Tensors = std::vector<Tensor>;

// The kernels' own signatures (csrc/dense_chain.cpp, csrc/softmax_xent.cpp): reached through
// the dispatcher, as from Python, so the tensors' backend picks the implementation.
using ChainForwardSig = std::tuple<Tensor, Tensors, Tensors>(const Tensor&, at::TensorList, at::TensorList,
                                                             std::vector<std::string>, at::ArrayRef<double>);
using ChainBackwardSig = std::tuple<Tensor, Tensors, Tensors>(
    const Tensor&, const Tensor&, at::TensorList, const Tensor&, at::TensorList, at::TensorList,
    std::vector<std::string>, at::ArrayRef<double>, c10::List<bool>, c10::List<bool>, bool);
using XentSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&);

template <typename Sig>
c10::TypedOperatorHandle<Sig> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// Sets p.grad as Python's `p.grad = g` does (an undefined g: None), touching no parameter
// that has no gradient to lose.
void set_grad(const Tensor& p, const Tensor& g) {
  if (g.defined() || p.grad().defined()) p.mutable_grad() = g;
}

// Rows a thread takes of a step, at least. On 2 threads, training with batches of 64 split in two
// ran 1.12x as fast as unsplit, with batches of 32 split in two 0.92x: below this a block's
// products are too small to run near the core's peak alone.
constexpr int64_t kMinBlockRows = 32;

// What one block of a step's rows gives: its logits, its row losses (times the row weights, if
// any) and its parameters' gradients (undefined where nothing trains).
struct Block {
  Tensor out, loss;
  Tensors dws, dbs;
};

// The calls of one step on rows [r0, r1) of step k's slice of the order: gather, forward, loss and
// its gradient, backward. Runs in the caller's thread; below autograd, so no graph is recorded.
Block step_rows(const ChainSteps& s, const ChainLayers& c, size_t k, int64_t r0, int64_t r1,
                const c10::List<bool>& need_w, const c10::List<bool>& need_b) {
  static const auto forward = op<ChainForwardSig>("densepipe::dense_chain_forward");
  static const auto backward = op<ChainBackwardSig>("densepipe::dense_chain_backward");
  static const auto xent = op<XentSig>("densepipe::softmax_cross_entropy");
  at::AutoDispatchBelowAutograd kernels_only;  // per thread: a worker thread starts without it
  const int64_t lo = s.bounds[k].first;
  const Tensor idx = s.order.slice(0, lo + r0, lo + r1);
  Tensor xb = s.buffer.slice(0, r0, r1);
  at::index_select_out(xb, s.x, 0, idx);
  const Tensor ids = s.target.index_select(0, idx).reshape(-1).to(at::kLong);
  // The loss total's chain rule down to the rows, in autograd's order: seed, head weight, row weight.
  const Tensor row_weight = s.class_weight.has_value() ? s.class_weight->index({ids}) : Tensor();
  const Tensor coef = row_weight.defined() ? s.coefs[k] * row_weight : s.coefs[k];
  const size_t n = c.weights.size();
  Block b{Tensor(), Tensor(), Tensors(n), Tensors(n)};
  auto [out, hidden, preacts] = forward.call(xb, c.weights, c.biases, c.activations, c.alphas);
  Tensor grad;
  std::tie(b.loss, grad) = xent.call(out, ids);
  grad.mul_(coef.dim() ? coef.unsqueeze(1) : coef);
  if (c.trains) {
    std::tie(std::ignore, b.dws, b.dbs) =
        backward.call(grad, xb, hidden, out, c.weights, preacts, c.activations, c.alphas, need_w, need_b, false);
  }
  if (row_weight.defined()) b.loss = b.loss * row_weight;
  b.out = std::move(out);
  return b;
}

// How many blocks a step of `rows` rows splits into: one per thread, each of at least
// kMinBlockRows rows, and one inside another parallel region (which has no threads to spare).
int64_t blocks_for(int64_t rows) {
  if (at::in_parallel_region()) return 1;
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows / kMinBlockRows));
}

// Sums the blocks' gradients of one parameter (that trains), in block order; undefined where
// nothing trains.
Tensor summed(std::vector<Block>& blocks, Tensors Block::*grads, size_t i) {
  Tensor total = (blocks[0].*grads)[i];
  if (!total.defined()) return total;
  for (size_t b = 1; b < blocks.size(); ++b) total.add_((blocks[b].*grads)[i]);
  return total;
}

// Runs fn(part) for parts [0, parts), one per thread. A single part runs on the caller, outside
// any parallel region: at::parallel_for would run it inline but marked as in one, and every op it
// calls would then keep to one thread.
template <typename Fn>
void each_part(int64_t parts, const Fn& fn) {
  if (parts == 1) return fn(0);
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) fn(p);
  });
}

// One parameter's share of the work after a step's blocks: its gradient's sum, set as its .grad,
// and for a weight that gradient's norm.
struct GradTask {
  size_t layer;
  bool weight;
  int64_t size;  // elements to sum (and take the norm of): what the task costs
};

// That work for every parameter that trains, and the same tasks dealt out among the threads for a
// step of several blocks: the largest first, each to the least loaded. On the calling thread alone
// these sums and norms took about a tenth of the benchmark MLP's step. Dealt once per epoch, since
// which parameters train changes only between epochs.
struct GradWork {
  std::vector<GradTask> tasks;
  std::vector<std::vector<GradTask>> shares;  // per thread
};

GradWork grad_work(const ChainLayers& c) {
  GradWork work;
  for (size_t i = 0; i < c.weights.size(); ++i) {
    if (c.need_weight[i]) work.tasks.push_back({i, true, c.weights[i].numel()});
    if (c.need_bias[i]) work.tasks.push_back({i, false, c.biases[i].numel()});
  }
  std::vector<GradTask> largest_first = work.tasks;
  std::sort(largest_first.begin(), largest_first.end(),
            [](const GradTask& a, const GradTask& b) { return a.size > b.size; });
  work.shares.resize(std::clamp<int64_t>(work.tasks.size(), 1, at::get_num_threads()));
  std::vector<int64_t> load(work.shares.size(), 0);
  for (const GradTask& t : largest_first) {
    const size_t least = std::min_element(load.begin(), load.end()) - load.begin();
    work.shares[least].push_back(t);
    load[least] += t.size;
  }
  return work;
}

// Sets every parameter's summed gradient (none where it does not train) and each weight's gradient
// norm (`zero` for one that does not train) into norms. A thread takes the whole of a parameter, so
// a norm is one reduction on one thread: the same bits as on the caller for a tensor too small for
// ATen to split (32768 elements or fewer), otherwise equal to rounding. One block needs no sums:
// its norms are taken on the caller as before.
void set_summed_grads(std::vector<Block>& blocks, const ChainLayers& c, const GradWork& work, const Tensor& zero,
                      Tensors& norms) {
  const size_t n = c.weights.size();
  for (size_t i = 0; i < n; ++i) {
    norms[i] = zero;
    if (!c.need_weight[i]) set_grad(c.weights[i], Tensor());
    if (!c.need_bias[i]) set_grad(c.biases[i], Tensor());
  }
  const bool split = blocks.size() > 1;
  Tensors dws(n), dbs(n);
  each_part(split ? work.shares.size() : 1, [&](int64_t t) {
    for (const GradTask& task : split ? work.shares[t] : work.tasks) {
      Tensor& g = (task.weight ? dws : dbs)[task.layer];
      g = summed(blocks, task.weight ? &Block::dws : &Block::dbs, task.layer);
      if (task.weight && g.defined()) norms[task.layer] = at::linalg_vector_norm(g, 2);
    }
  });
  // On the caller, which holds the GIL: replacing a .grad frees the old one, and freeing a tensor
  // that Python has seen (the optimizer reads every .grad) takes the GIL.
  for (const GradTask& task : work.tasks) {
    set_grad(task.weight ? c.weights[task.layer] : c.biases[task.layer], (task.weight ? dws : dbs)[task.layer]);
  }
}

}  // namespace

std::tuple<Tensor, Tensor> chain_classifier_epoch(const ChainSteps& s, const ChainLayers& c,
                                                  const std::function<void()>& update) {
  const size_t steps = s.bounds.size(), n = c.weights.size();
  TORCH_CHECK(s.coefs.size() == steps, "densepipe chain_classifier_epoch: ", s.coefs.size(), " coefs for ",
              steps, " steps");
  TORCH_CHECK(n > 0 && c.biases.size() == n && c.need_weight.size() == n && c.need_bias.size() == n,
              "densepipe chain_classifier_epoch: the chain's lists differ in length");
  c10::List<bool> need_w, need_b;
  for (size_t i = 0; i < n; ++i) {
    need_w.push_back(c.need_weight[i]);
    need_b.push_back(c.need_bias[i]);
  }
  const Tensor zero = c.weights[0].new_zeros({});  // the gradient norm of a frozen layer
  const GradWork work = grad_work(c);
  Tensors rows, outputs, losses, norms(n);
  rows.reserve(steps);
  outputs.reserve(steps);
  for (size_t k = 0; k < steps; ++k) {
    const int64_t size = s.bounds[k].second - s.bounds[k].first, parts = blocks_for(size);
    std::vector<Block> blocks(parts);
    each_part(parts, [&](int64_t b) {
      blocks[b] = step_rows(s, c, k, size * b / parts, size * (b + 1) / parts, need_w, need_b);
    });
    losses.clear();
    for (Block& b : blocks) {
      losses.push_back(b.loss);
      outputs.push_back(b.out);
    }
    // Norms of the gradients as backward made them, before clipping rescales them.
    set_summed_grads(blocks, c, work, zero, norms);
    const Tensor part = (parts == 1 ? losses[0] : at::cat(losses)).sum();
    const Tensor total = c.head_weight == 1.0 ? part : part * c.head_weight;
    Tensors row = {total, part};
    row.insert(row.end(), norms.begin(), norms.end());
    update();
    rows.push_back(at::stack(row));
  }
  return {at::stack(rows), at::cat(outputs)};
}

}  // namespace densepipe
