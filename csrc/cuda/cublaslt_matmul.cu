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
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <type_traits>
#include <unordered_map>
#include <utility>

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
constexpr cublasLtEpilogue_t kEpilogues[2][2] = {
    {CUBLASLT_EPILOGUE_DEFAULT, CUBLASLT_EPILOGUE_BIAS},
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

// Everything the heuristic's answer depends on. Training repeats a handful of
// shapes, so asking once per problem keeps the per-call host cost to building
// the descriptors.
struct AlgoKey {
  int64_t device, dtype, m, n, k, epilogue, tf32;
  int64_t align_a, align_b, align_d, align_bias, align_aux;  // bytes, as passed to the heuristic
  bool operator==(const AlgoKey&) const = default;
};

struct AlgoKeyHash {
  size_t operator()(const AlgoKey& key) const {
    size_t h = 0;
    for (int64_t f : {key.device, key.dtype, key.m, key.n, key.k, key.epilogue, key.tf32, key.align_a,
                      key.align_b, key.align_d, key.align_bias, key.align_aux}) {
      h = h * 1000003u ^ std::hash<int64_t>{}(f);
    }
    return h;
  }
};

// The heuristic's algorithm per problem, or nullopt where cuBLASLt had none.
class AlgoCache {
 public:
  static constexpr size_t kMaxEntries = 4096;  // varied inference shapes must not grow it without bound

  std::optional<std::optional<cublasLtMatmulAlgo_t>> find(const AlgoKey& key) {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto it = map_.find(key);
    if (it == map_.end()) return std::nullopt;
    return it->second;
  }

  void put(const AlgoKey& key, std::optional<cublasLtMatmulAlgo_t> algo) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (map_.size() >= kMaxEntries) map_.clear();
    map_.emplace(key, algo);
  }

 private:
  std::mutex mutex_;
  std::unordered_map<AlgoKey, std::optional<cublasLtMatmulAlgo_t>, AlgoKeyHash> map_;
};

AlgoCache& algo_cache() {
  static AlgoCache cache;
  return cache;
}

// Asks the heuristic for one algorithm; nullopt when it has none (or fails).
std::optional<cublasLtMatmulAlgo_t> heuristic_algo(cublasLtHandle_t handle, cublasLtMatmulDesc_t desc,
                                                   cublasLtMatrixLayout_t a, cublasLtMatrixLayout_t b,
                                                   cublasLtMatrixLayout_t d, const AlgoKey& key) {
  cublasLtMatmulPreference_t raw_pref = nullptr;
  if (cublasLtMatmulPreferenceCreate(&raw_pref) != CUBLAS_STATUS_SUCCESS) return std::nullopt;
  const Preference pref(raw_pref);
  // No split-K partial sums stored in the (half-precision) output type: float32 accumulation throughout.
  const uint32_t reductions = CUBLASLT_REDUCTION_SCHEME_INPLACE | CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE;
  const std::pair<cublasLtMatmulPreferenceAttributes_t, uint32_t> u32_prefs[] = {
      {CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, reductions},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, static_cast<uint32_t>(key.align_a)},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, static_cast<uint32_t>(key.align_b)},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, static_cast<uint32_t>(key.align_d)},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, static_cast<uint32_t>(key.align_d)},
  };
  if (set_pref(pref.get(), CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, uint64_t{kWorkspaceBytes}) !=
      CUBLAS_STATUS_SUCCESS) {
    return std::nullopt;
  }
  for (const auto& [attr, value] : u32_prefs) {
    if (set_pref(pref.get(), attr, value) != CUBLAS_STATUS_SUCCESS) return std::nullopt;
  }
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  if (cublasLtMatmulAlgoGetHeuristic(handle, desc, a, b, d, d, pref.get(), 1, &result, &found) !=
          CUBLAS_STATUS_SUCCESS ||
      found == 0 || result.state != CUBLAS_STATUS_SUCCESS) {
    return std::nullopt;
  }
  return result.algo;
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
  // For bfloat16 rows that are not 16-byte aligned, the kernels cuBLASLt picks round x W^T
  // to bfloat16 before the bias epilogue adds the bias (seen on an H100): z is rounded twice
  // and can change sign near zero, flipping relu's mask. addmm rounds once.
  if (x.scalar_type() == at::kBFloat16 && bias.defined() && (k % 8 != 0 || n % 8 != 0)) return false;
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
  const cublasLtEpilogue_t epilogue = kEpilogues[static_cast<int>(act)][with_bias ? 1 : 0];
  DENSEPIPE_LT_TRY(set_desc(desc.get(), CUBLASLT_MATMUL_DESC_EPILOGUE, epilogue));
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

  const AlgoKey key{x.device().index(),
                    static_cast<int64_t>(x.scalar_type()),
                    m, n, k,
                    static_cast<int64_t>(epilogue),
                    tf32,
                    alignment_of(weight.const_data_ptr()),
                    alignment_of(x.const_data_ptr()),
                    alignment_of(out.data_ptr()),
                    with_bias ? alignment_of(bias.const_data_ptr()) : 0,
                    with_aux ? alignment_of(aux.data_ptr()) : 0};
  auto cached = algo_cache().find(key);
  if (!cached) {
    cached.emplace(heuristic_algo(handle, desc.get(), a_layout.get(), b_layout.get(), d_layout.get(), key));
    algo_cache().put(key, *cached);
  }
  if (!cached->has_value()) return false;
  const cublasLtMatmulAlgo_t algo = **cached;

  const at::Tensor workspace = at::empty({static_cast<int64_t>(kWorkspaceBytes)}, x.options().dtype(at::kByte));
  const float alpha = 1.0f, beta = 0.0f;
  DENSEPIPE_LT_TRY(cublasLtMatmul(handle, desc.get(), &alpha, weight.const_data_ptr(), a_layout.get(),
                                  x.const_data_ptr(), b_layout.get(), &beta, out.data_ptr(), d_layout.get(),
                                  out.data_ptr(), d_layout.get(), &algo, workspace.data_ptr(),
                                  kWorkspaceBytes, c10::cuda::getCurrentCUDAStream().stream()));
  return true;
}

#undef DENSEPIPE_LT_TRY

}  // namespace densepipe::cuda
