// The dense layer's GEMM through cuBLASLt, with bias and activation fused into
// the matmul epilogue where cuBLASLt offers one.
#pragma once

#include <ATen/core/Tensor.h>

namespace densepipe::cuda {

// The activations cuBLASLt computes inside its epilogue. Its RELU epilogues are
// left out: they turn a NaN pre-activation into 0, where torch.relu keeps the NaN
// (and a NaN weight must not vanish from the loss the divergence guard watches).
enum class LtActivation : int {
  None,         // bias only (or nothing)
  GeluTanhAux,  // tanh-approximated GELU, pre-activation stored to aux
};

// The pre-activation (aux) matrix's leading dimension must be a multiple of this
// for the GELU_AUX epilogues.
constexpr int64_t kLtAuxLdMultiple = 8;

// False when DENSEPIPE_DISABLE_CUBLASLT=1 is set (read on every call, so both
// paths can be compared in one process).
bool lt_enabled();

// out[M,N] = act(x[M,K] @ weight[N,K]^T + bias[N]) in one cuBLASLt call, on the
// current stream. bias may be undefined; aux receives x @ weight^T + bias for
// GeluTanhAux and must be undefined otherwise. Every tensor contiguous, on the
// current device, float32 / float16 / bfloat16, with M, N, K > 0.
// Returns false when cuBLASLt is disabled, declines the problem (dtype, no
// algorithm for these sizes or alignments) or reports an error; the caller then
// computes the whole result on its generic path.
bool lt_dense_matmul(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                     LtActivation act, const at::Tensor& out, const at::Tensor& aux);

}  // namespace densepipe::cuda
