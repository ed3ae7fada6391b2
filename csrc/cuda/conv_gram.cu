// CUDA kernel of sap_fast::conv_gram_launch (schema in csrc/sap_fast.cpp): launches the
// implicit-im2col Gram kernels of conv_gram_kernels.cuh from a launch plan made in Python
// (sap_fast/backends/conv_launch.py, which also serves torch.ops.sap_fast.conv_gram on CUDA
// through this op). The plan decides the tile kernel (the FMA tiles, or for a float64 G the FP64
// tensor-core tiles, `dmma`), the rows per split-K range and the mirror's grid; this file checks
// every input in one block, derives the tile grid from rows_per_split as the kernels' indexing
// requires (tile_grid_size), views 1-D/2-D convs as 3-D ones with size-1 dims, and launches the
// tiles, then the mirror, on the current stream of x's device, writing all of G.
//
// Only c10/cuda headers, not ATen/cuda/CUDAContext.h: that one pulls in the cuBLAS/cuSPARSE/
// cuSOLVER headers, which a compile check on a machine without them could not find.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <type_traits>

#include "conv_gram_kernels.cuh"
#include "conv_gram_shape.h"

namespace {

using sap_fast::cuda::ConvGramShape;
using Tiling = sap_fast::cuda::DefaultGramTiling;

// The tiles (on tensor cores where `dmma`; only a float64 G gets there), then the mirror.
template <typename scalar_t, typename acc_t>
void launch_tiles(const at::Tensor& x, at::Tensor& gram, const ConvGramShape& s, int64_t rows_per_split, bool dmma,
                  unsigned mirror_blocks, unsigned mirror_threads, cudaStream_t stream) {
  int64_t size[3];
  sap_fast::cuda::tile_grid_size<Tiling>(s, rows_per_split, size);
  const dim3 grid(static_cast<unsigned>(size[0]), static_cast<unsigned>(size[1]), static_cast<unsigned>(size[2]));
  const dim3 block(Tiling::kThreadsPerDim, Tiling::kThreadsPerDim);
  const scalar_t* in = x.const_data_ptr<scalar_t>();
  acc_t* out = gram.mutable_data_ptr<acc_t>();
  if constexpr (std::is_same_v<acc_t, double>) {
    if (dmma) {
      sap_fast::cuda::conv_gram_dmma_kernel<scalar_t, Tiling><<<grid, block, 0, stream>>>(in, out, s, rows_per_split);
    } else {
      sap_fast::cuda::conv_gram_tile_kernel<scalar_t, acc_t, Tiling><<<grid, block, 0, stream>>>(in, out, s,
                                                                                                rows_per_split);
    }
  } else {
    sap_fast::cuda::conv_gram_tile_kernel<scalar_t, acc_t, Tiling><<<grid, block, 0, stream>>>(in, out, s,
                                                                                              rows_per_split);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  sap_fast::cuda::mirror_upper_to_lower_kernel<acc_t><<<mirror_blocks, mirror_threads, 0, stream>>>(out, s.width,
                                                                                                     s.groups);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void conv_gram_launch_cuda(const at::Tensor& x, at::Tensor& gram, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, int64_t rows_per_split,
                           bool dmma, int64_t mirror_blocks, int64_t mirror_threads) {
  // Every input, checked here before anything is queued.
  TORCH_CHECK(x.is_cuda(), "conv_gram_launch: x must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(gram.device() == x.device(), "conv_gram_launch: gram must be on x's device (", x.device(), "), got ",
              gram.device());
  TORCH_CHECK(gram.scalar_type() == at::kFloat || gram.scalar_type() == at::kDouble,
              "conv_gram_launch: gram (the accumulation dtype) must be float32 or float64, got ", gram.scalar_type());
  // x's rank and dtype, the geometry, and the kernels' own limits (conv_geometry.h, conv_gram_shape.h)
  const ConvGramShape s =
      sap_fast::cuda::conv_gram_shape(x, kernel_size, stride, padding, dilation, groups, gram.scalar_type());
  TORCH_CHECK(x.is_contiguous(), "conv_gram_launch: x must be contiguous; pass x.contiguous()");
  TORCH_CHECK(gram.dim() == 3 && gram.size(0) == s.groups && gram.size(1) == s.width && gram.size(2) == s.width,
              "conv_gram_launch: gram must be (groups, d, d) = (", s.groups, ", ", s.width, ", ", s.width,
              ") for this conv, got ", gram.sizes());
  TORCH_CHECK(gram.is_contiguous(), "conv_gram_launch: gram must be contiguous; allocate it with torch.empty");
  sap_fast::cuda::conv_gram_splits(s, rows_per_split, "conv_gram_launch");
  TORCH_CHECK(!dmma || gram.scalar_type() == at::kDouble,
              "conv_gram_launch: dmma (the FP64 tensor-core tiles) computes float64 Grams only, got a ",
              gram.scalar_type(), " gram; pass dmma=False");
  TORCH_CHECK(mirror_blocks >= 1 && mirror_blocks <= 2147483647LL && mirror_threads >= 1 && mirror_threads <= 1024,
              "conv_gram_launch: the mirror's grid must be 1 to 2^31 - 1 blocks of 1 to 1024 threads, got ",
              mirror_blocks, " blocks of ", mirror_threads);

  const c10::cuda::CUDAGuard device_guard(x.device());
  gram.zero_();  // the tiles add into G with atomicAdd
  if (s.rows == 0 || s.width == 0) return;  // no rows (N = 0) or no columns (C = 0): G = 0
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
  const auto blocks = static_cast<unsigned>(mirror_blocks);
  const auto threads = static_cast<unsigned>(mirror_threads);
  const bool x_double = x.scalar_type() == at::kDouble;
  const bool acc_double = gram.scalar_type() == at::kDouble;
  if (!x_double && acc_double) {
    launch_tiles<float, double>(x, gram, s, rows_per_split, dmma, blocks, threads, stream);
  } else if (!x_double) {
    launch_tiles<float, float>(x, gram, s, rows_per_split, dmma, blocks, threads, stream);
  } else if (acc_double) {
    launch_tiles<double, double>(x, gram, s, rows_per_split, dmma, blocks, threads, stream);
  } else {
    launch_tiles<double, float>(x, gram, s, rows_per_split, dmma, blocks, threads, stream);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(sap_fast, CUDA, m) { m.impl("conv_gram_launch", &conv_gram_launch_cuda); }
