// One epoch of a dense-chain classifier's training steps in one call (see chain_epoch.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace densepipe {

// What the epoch's steps read: the split, the step order and the batch buffer.
struct ChainSteps {
  at::Tensor x;                                      // (N, features) the split's inputs
  at::Tensor target;                                 // (N,) or (N, 1) class ids
  at::Tensor order;                                  // (rows,) row ids, step after step
  at::Tensor buffer;                                 // (widest step, features) the gathered batch
  std::vector<std::pair<int64_t, int64_t>> bounds;   // per step: its slice [lo, hi) of order
  std::vector<at::Tensor> coefs;                     // per step: backward's seed (times the head weight), 0-d
  std::optional<at::Tensor> class_weight;            // (classes,) each class's row weight, or none
};

// The chain as the epoch binds it (train/direct.py's _Chain.bind).
struct ChainLayers {
  std::vector<at::Tensor> weights;     // (out, in) per layer
  std::vector<at::Tensor> biases;      // (out,) per layer; empty for no bias
  std::vector<std::string> activations;
  std::vector<double> alphas;
  std::vector<bool> need_weight, need_bias;  // which parameters train
  bool trains;                               // whether any does (else no backward)
  double head_weight;                        // the output's loss weight
};

// Runs the steps; after each step's gradients are set (as `.grad`) calls update(), the
// optimizer's step. Returns (log, outputs): log (steps, 2 + layers) holds each step's loss
// total, its output's loss sum and each layer's weight-gradient norm; outputs (rows, classes)
// the logits of every step, in step order.
std::tuple<at::Tensor, at::Tensor> chain_classifier_epoch(const ChainSteps& steps, const ChainLayers& chain,
                                                          const std::function<void()>& update);

}  // namespace densepipe
