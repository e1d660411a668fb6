// Fused optimizer steps and gradient clipping: argument checks shared by every
// backend. Each op takes parallel tensor lists (one tensor per parameter) and
// updates them in place; the checks name the list, the index and what is allowed.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <vector>

#include "optim_math.h"

namespace densepipe::optim {

// One list argument of an op: its schema name, its tensors, and whether the op
// writes it (written lists must be dense in memory; read-only ones are copied
// into the parameter's layout when they differ).
struct NamedList {
  const char* name;
  at::TensorList tensors;
  bool written;
};

// The lists of one op call, checked and ready to run: views of the arguments
// themselves (a step touches hundreds of tensors; no reference-count traffic),
// except a read-only list that needed copies in another layout, held in `owned`.
struct Lists {
  std::vector<at::TensorList> views;
  std::vector<std::vector<at::Tensor>> owned;

  size_t size() const { return views.size(); }
  const at::TensorList& operator[](size_t k) const { return views[k]; }
  bool empty() const { return views.empty() || views[0].empty(); }
};

// Validates lists[0] (the parameters) against every other list: same length,
// device, shape and memory layout; params and grads share a dtype, state lists
// use the parameter's dtype or float32.
Lists check_lists(const char* op, const std::vector<NamedList>& lists);

// The checks for one op's gradient list alone (clipping): one device, one dtype.
Lists check_grads(const char* op, at::TensorList grads, bool written);

// TORCH_CHECKs that a hyperparameter lies in [lo, hi] (or [lo, hi) when open_hi).
void check_range(const char* op, const char* name, double value, double lo, double hi,
                 bool open_hi = false);

// The update rules' scalars, computed in double on the host from the step count.
struct AdamScalars {
  double step_size;  // lr / (1 - beta1^step)
  double bc2_sqrt;   // sqrt(1 - beta2^step)
};
AdamScalars adam_scalars(double lr, double beta1, double beta2, double step);
double adagrad_lr(double lr, double lr_decay, double step);  // lr / (1 + (step - 1) * lr_decay)
struct NadamScalars {
  double grad_step;  // lr (1 - mu_t) / (1 - prod mu)
  double avg_step;   // lr mu_{t+1} / (1 - prod mu * mu_{t+1})
};
// mu_t = beta1 (1 - 0.96^(t momentum_decay) / 2), the momentum schedule of NAdam.
double nadam_mu(double beta1, double momentum_decay, double step);
NadamScalars nadam_scalars(double lr, double beta1, double momentum_decay, double step,
                           double mu_product);

NormKind parse_norm(const char* op, double norm_type);

}  // namespace densepipe::optim
