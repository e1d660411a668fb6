// Multi-tensor apply: one kernel launch covers many tensors. The host cuts every
// tensor into chunks of kChunk elements and packs, per launch, the tensors' data
// pointers and sizes plus a block -> (tensor, chunk) map into the kernel's
// argument buffer (no device-side metadata, no extra copies); a launch is made
// whenever that buffer is full. Indexing is 64-bit throughout.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "../optim.h"

namespace densepipe::optim::cuda {

constexpr int kBlockThreads = 512;
constexpr int64_t kChunk = 65536;  // elements per block
constexpr int kMaxBlocks = 320;    // blocks per launch

// Tensors per launch for N lists, keeping the arguments within CUDA's 4 KB.
constexpr int max_tensors(int lists) {
  return lists <= 1 ? 110 : lists == 2 ? 64 : lists == 3 ? 48 : lists == 4 ? 36 : 30;
}

template <int N>
struct ListMeta {
  void* addr[N][max_tensors(N)];
  int64_t numel[max_tensors(N)];
  unsigned char block_tensor[kMaxBlocks];  // which tensor slot a block works on
  int block_chunk[kMaxBlocks];             // which chunk of that tensor
};

// Calls launch(meta, blocks, first_block) once per full argument buffer;
// first_block numbers the launch's blocks across all launches (for partial results).
template <int N, typename Launch>
void multi_tensor_apply(const Lists& lists, Launch&& launch) {
  ListMeta<N> meta;
  int tensors = 0, blocks = 0;
  int64_t first_block = 0;
  const size_t n = lists[0].size();
  for (size_t t = 0; t < n; ++t) {
    const int64_t numel = lists[0][t].numel();
    if (numel == 0) continue;
    for (int k = 0; k < N; ++k) meta.addr[k][tensors] = lists[k][t].data_ptr();
    meta.numel[tensors] = numel;
    ++tensors;
    const int64_t chunks = (numel + kChunk - 1) / kChunk;
    for (int64_t c = 0; c < chunks; ++c) {
      meta.block_tensor[blocks] = static_cast<unsigned char>(tensors - 1);
      meta.block_chunk[blocks] = static_cast<int>(c);
      ++blocks;
      const bool last_chunk = c == chunks - 1;
      if (blocks == kMaxBlocks || (tensors == max_tensors(N) && last_chunk)) {
        launch(meta, blocks, first_block);
        first_block += blocks;
        blocks = 0;
        if (last_chunk) {
          tensors = 0;
        } else {  // the tensor continues in the next launch, in slot 0
          for (int k = 0; k < N; ++k) meta.addr[k][0] = meta.addr[k][tensors - 1];
          meta.numel[0] = meta.numel[tensors - 1];
          tensors = 1;
        }
      }
    }
  }
  if (blocks > 0) launch(meta, blocks, first_block);
}

// Number of blocks multi_tensor_apply will run over these tensors.
inline int64_t total_blocks(at::TensorList tensors) {
  int64_t b = 0;
  for (const auto& t : tensors) b += (t.numel() + kChunk - 1) / kChunk;
  return b;
}

}  // namespace densepipe::optim::cuda
