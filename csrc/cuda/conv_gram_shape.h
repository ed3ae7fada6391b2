// The checked shape of one conv_gram call as the CUDA kernels see it (csrc/cuda/conv_gram_kernels.cuh),
// and the check of the split-K ranges a launch plan gives them: shared by the CUDA launch op
// (csrc/cuda/conv_gram.cu) and the CPU twin of its tensor-core tiles (csrc/cpu/conv_gram_dmma_twin.cpp),
// so both run the kernels on the same ConvGramShape and the same grid.
#pragma once

#include <cstdint>
#include <limits>

#include "conv_geometry.h"
#include "conv_gram_kernels.cuh"

namespace sap_fast::cuda {

// The schema's argument checks (shared with the CPU kernels), then the 3-D shape (leading size-1
// dims for 1-D/2-D convs) that the kernels work on, and the limits of the CUDA grid.
inline ConvGramShape conv_gram_shape(const at::Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                     at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                     at::ScalarType dtype) {
  const sap_fast::ConvGeometry g =
      sap_fast::conv_geometry(x, kernel_size, stride, padding, dilation, groups, dtype, "conv_gram");
  TORCH_CHECK(groups <= 65535, "conv_gram: at most 65535 groups are supported on CUDA, got ", groups);
  ConvGramShape s{};
  s.batch = g.batch;
  s.channels = g.channels;
  s.groups = g.groups;
  s.group_channels = g.group_channels;
  s.taps = g.taps;
  s.positions = g.positions;
  s.width = g.width;
  const int64_t first = 3 - g.spatial();  // 1-D: (1, 1, L); 2-D: (1, H, W)
  for (int64_t i = 0; i < 3; ++i) {
    s.in_size[i] = s.out_size[i] = s.kernel[i] = s.stride[i] = s.dilation[i] = 1;
    s.padding[i] = 0;
  }
  for (int64_t i = 0; i < g.spatial(); ++i) {
    // Guards the kernels' int64 index arithmetic against absurd values.
    TORCH_CHECK(g.kernel[i] <= (1 << 20) && g.stride[i] <= (1 << 30) && g.dilation[i] <= (1 << 20) &&
                    g.padding[i] <= (1 << 30),
                "conv_gram: kernel_size/stride/padding/dilation out of range: ", kernel_size, ", ", stride,
                ", ", padding, ", ", dilation);
    const int64_t d = first + i;
    s.in_size[d] = g.input[i];
    s.out_size[d] = g.output[i];
    s.kernel[d] = g.kernel[i];
    s.stride[d] = g.stride[i];
    s.padding[d] = g.padding[i];
    s.dilation[d] = g.dilation[i];
  }
  TORCH_CHECK(s.positions == 0 || s.batch <= std::numeric_limits<int64_t>::max() / s.positions,
              "conv_gram: N * output positions overflows int64");
  s.rows = s.batch * s.positions;
  TORCH_CHECK(conv_gram_grid_fits(s, DefaultGramTiling::kTile),
              "conv_gram: Gram width d = ", s.width, " is too large for the CUDA kernel's grid");
  return s;
}

// The row ranges per tile (gridDim.z) of ranges of rows_per_split rows, after checking that
// rows_per_split is a positive multiple of the chunk (the kernels walk whole chunks from each
// range's start) and that the ranges fit gridDim.z. `op` names the caller in the messages.
inline int64_t conv_gram_splits(const ConvGramShape& s, int64_t rows_per_split, const char* op) {
  constexpr int64_t kChunk = DefaultGramTiling::kChunk;
  constexpr int64_t kMaxSplits = 65535;  // gridDim.z
  TORCH_CHECK(rows_per_split > 0 && rows_per_split % kChunk == 0, op,
              ": rows_per_split must be a positive multiple of ", kChunk, " (whole chunks of rows), got ",
              rows_per_split, "; take it from sap_fast.backends.conv_launch.plan");
  const int64_t splits = s.rows / rows_per_split + (s.rows % rows_per_split != 0);
  TORCH_CHECK(splits <= kMaxSplits, op, ": rows_per_split=", rows_per_split, " cuts the ", s.rows,
              " rows into ", splits, " ranges, more than gridDim.z allows (", kMaxSplits,
              "); take it from sap_fast.backends.conv_launch.plan");
  return splits;
}

}  // namespace sap_fast::cuda
