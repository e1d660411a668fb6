// cuBLASLt GEMM with a fused bias / activation epilogue for the dense layer.
//
// Row-major y[M,N] = x[M,K] @ W[N,K]^T is, in cuBLASLt's column-major terms,
// D[N,M] = op(A)[N,K] @ B[K,M] with A = W (stored K x N, ld K, transa = T),
// B = x (stored K x M, ld K, transb = N) and D ld N; the bias is per row of D.
#include "cublaslt_matmul.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <cublasLt.h>

#include <array>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <type_traits>

namespace densepipe::cuda {

namespace {

// cuBLAS's recommended workspace on Hopper; the caching allocator hands the
// same block back on later calls, so asking for it each time costs nothing.
constexpr size_t kWorkspaceBytes = size_t{32} << 20;
constexpr uint32_t kMaxAlignment = 256;  // cuBLASLt's default assumption about every matrix pointer

// A failing cuBLASLt call makes lt_dense_matmul give up (return false).
#define DENSEPIPE_LT_TRY(expr)                         \
  do {                                                 \
    if ((expr) != CUBLAS_STATUS_SUCCESS) return false; \
  } while (0)

template <typename Handle, cublasStatus_t (*Destroy)(Handle)>
struct LtDestroy {
  void operator()(std::remove_pointer_t<Handle>* h) const { Destroy(h); }
};
template <typename Handle, cublasStatus_t (*Destroy)(Handle)>
using LtOwned = std::unique_ptr<std::remove_pointer_t<Handle>, LtDestroy<Handle, Destroy>>;
using Desc = LtOwned<cublasLtMatmulDesc_t, cublasLtMatmulDescDestroy>;
using Layout = LtOwned<cublasLtMatrixLayout_t, cublasLtMatrixLayoutDestroy>;
using Preference = LtOwned<cublasLtMatmulPreference_t, cublasLtMatmulPreferenceDestroy>;

// Indexed [LtActivation][has bias].
constexpr cublasLtEpilogue_t kEpilogues[3][2] = {
    {CUBLASLT_EPILOGUE_DEFAULT, CUBLASLT_EPILOGUE_BIAS},
    {CUBLASLT_EPILOGUE_RELU, CUBLASLT_EPILOGUE_RELU_BIAS},
    {CUBLASLT_EPILOGUE_GELU_AUX, CUBLASLT_EPILOGUE_GELU_AUX_BIAS},
};

std::optional<cudaDataType_t> lt_data_type(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return CUDA_R_32F;
    case at::kHalf: return CUDA_R_16F;
    case at::kBFloat16: return CUDA_R_16BF;
    default: return std::nullopt;  // float64 takes the generic path
  }
}

// One handle per device, created on first use and kept for the process: a
// cuBLASLt handle holds no stream or workspace, so threads can share it.
cublasLtHandle_t lt_handle(c10::DeviceIndex device) {
  static std::mutex mutex;
  static std::array<cublasLtHandle_t, C10_COMPILE_TIME_MAX_GPUS> handles{};  // from c10/cuda/CUDAMacros.h
  if (device < 0 || device >= C10_COMPILE_TIME_MAX_GPUS) return nullptr;
  std::lock_guard<std::mutex> lock(mutex);
  if (handles[device] == nullptr) {
    cublasLtHandle_t h = nullptr;
    if (cublasLtCreate(&h) != CUBLAS_STATUS_SUCCESS) return nullptr;
    handles[device] = h;
  }
  return handles[device];
}

// The largest power of two (up to 256) dividing the address: tells the
// heuristic not to pick kernels that need more alignment than we have.
uint32_t alignment_of(const void* p) {
  const auto addr = reinterpret_cast<uintptr_t>(p);
  uint32_t a = kMaxAlignment;
  while (a > 1 && addr % a != 0) a /= 2;
  return a;
}

template <typename V>
cublasStatus_t set_desc(cublasLtMatmulDesc_t d, cublasLtMatmulDescAttributes_t attr, const V& v) {
  return cublasLtMatmulDescSetAttribute(d, attr, &v, sizeof(v));
}

template <typename V>
cublasStatus_t set_pref(cublasLtMatmulPreference_t p, cublasLtMatmulPreferenceAttributes_t attr,
                        const V& v) {
  return cublasLtMatmulPreferenceSetAttribute(p, attr, &v, sizeof(v));
}

bool make_layout(Layout& out, cudaDataType_t type, int64_t rows, int64_t cols, int64_t ld) {
  cublasLtMatrixLayout_t raw = nullptr;
  DENSEPIPE_LT_TRY(cublasLtMatrixLayoutCreate(&raw, type, static_cast<uint64_t>(rows),
                                              static_cast<uint64_t>(cols), ld));
  out.reset(raw);
  return true;
}

}  // namespace

bool lt_enabled() {
  const char* v = std::getenv("DENSEPIPE_DISABLE_CUBLASLT");
  return v == nullptr || std::strcmp(v, "1") != 0;
}

bool lt_dense_matmul(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                     LtActivation act, const at::Tensor& out, const at::Tensor& aux) {
  if (!lt_enabled()) return false;
  const auto type = lt_data_type(x.scalar_type());
  if (!type) return false;
  const int64_t m = x.size(0), k = x.size(1), n = weight.size(0);  // row-major sizes
  if (m == 0 || n == 0 || k == 0) return false;
  const bool with_aux = act == LtActivation::GeluTanhAux;
  TORCH_INTERNAL_ASSERT(with_aux == aux.defined(), "densepipe: aux must be given exactly for GeluTanhAux");
  if (with_aux && n % kLtAuxLdMultiple != 0) return false;
  cublasLtHandle_t handle = lt_handle(x.device().index());
  if (handle == nullptr) return false;

  // float32 follows torch.backends.cuda.matmul.allow_tf32 like at::mm does;
  // half types always accumulate in float32.
  const bool tf32 = x.scalar_type() == at::kFloat && at::globalContext().allowTF32CuBLAS();
  const cublasComputeType_t compute = tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
  cublasLtMatmulDesc_t raw_desc = nullptr;
  DENSEPIPE_LT_TRY(cublasLtMatmulDescCreate(&raw_desc, compute, CUDA_R_32F));
  const Desc desc(raw_desc);
  DENSEPIPE_LT_TRY(set_desc(desc.get(), CUBLASLT_MATMUL_DESC_TRANSA, CUBLAS_OP_T));
  DENSEPIPE_LT_TRY(set_desc(desc.get(), CUBLASLT_MATMUL_DESC_TRANSB, CUBLAS_OP_N));
  const bool with_bias = bias.defined();
  DENSEPIPE_LT_TRY(set_desc(desc.get(), CUBLASLT_MATMUL_DESC_EPILOGUE,
                            kEpilogues[static_cast<int>(act)][with_bias ? 1 : 0]));
  if (with_bias) {
    DENSEPIPE_LT_TRY(set_desc(desc.get(), CUBLASLT_MATMUL_DESC_BIAS_POINTER, bias.const_data_ptr()));
  }
  if (with_aux) {
    // aux is the row-major [M, N] pre-activation: column-major N x M with ld N.
    DENSEPIPE_LT_TRY(set_desc(desc.get(), CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, aux.data_ptr()));
    DENSEPIPE_LT_TRY(set_desc(desc.get(), CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, n));
  }

  Layout a_layout, b_layout, d_layout;
  if (!make_layout(a_layout, *type, k, n, k) || !make_layout(b_layout, *type, k, m, k) ||
      !make_layout(d_layout, *type, n, m, n)) {
    return false;
  }

  cublasLtMatmulPreference_t raw_pref = nullptr;
  DENSEPIPE_LT_TRY(cublasLtMatmulPreferenceCreate(&raw_pref));
  const Preference pref(raw_pref);
  DENSEPIPE_LT_TRY(set_pref(pref.get(), CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, uint64_t{kWorkspaceBytes}));
  // No split-K partial sums stored in the (half-precision) output type: float32 accumulation throughout.
  const uint32_t reductions = CUBLASLT_REDUCTION_SCHEME_INPLACE | CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE;
  DENSEPIPE_LT_TRY(set_pref(pref.get(), CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, reductions));
  const uint32_t out_align = alignment_of(out.data_ptr());
  DENSEPIPE_LT_TRY(set_pref(pref.get(), CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                            alignment_of(weight.const_data_ptr())));
  DENSEPIPE_LT_TRY(set_pref(pref.get(), CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                            alignment_of(x.const_data_ptr())));
  DENSEPIPE_LT_TRY(set_pref(pref.get(), CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, out_align));
  DENSEPIPE_LT_TRY(set_pref(pref.get(), CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, out_align));

  cublasLtMatmulHeuristicResult_t heuristic{};
  int found = 0;
  DENSEPIPE_LT_TRY(cublasLtMatmulAlgoGetHeuristic(handle, desc.get(), a_layout.get(), b_layout.get(),
                                                  d_layout.get(), d_layout.get(), pref.get(), 1,
                                                  &heuristic, &found));
  if (found == 0 || heuristic.state != CUBLAS_STATUS_SUCCESS) return false;

  const at::Tensor workspace = at::empty({static_cast<int64_t>(kWorkspaceBytes)}, x.options().dtype(at::kByte));
  const float alpha = 1.0f, beta = 0.0f;
  DENSEPIPE_LT_TRY(cublasLtMatmul(handle, desc.get(), &alpha, weight.const_data_ptr(), a_layout.get(),
                                  x.const_data_ptr(), b_layout.get(), &beta, out.data_ptr(), d_layout.get(),
                                  out.data_ptr(), d_layout.get(), &heuristic.algo, workspace.data_ptr(),
                                  kWorkspaceBytes, c10::cuda::getCurrentCUDAStream().stream()));
  return true;
}

#undef DENSEPIPE_LT_TRY

}  // namespace densepipe::cuda
