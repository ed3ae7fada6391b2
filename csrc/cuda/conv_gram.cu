// CUDA kernel of sap_fast::conv_gram (schema in csrc/sap_fast.cpp): checks the arguments, views
// 1-D/2-D convs as 3-D ones with size-1 dims, and launches the implicit-im2col Gram kernels of
// conv_gram_kernels.cuh on the caller's current stream.
//
// Only c10/cuda headers, not ATen/cuda/CUDAContext.h: that one pulls in the cuBLAS/cuSPARSE/
// cuSOLVER headers, which a compile check on a machine without them could not find.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>

#include "conv_geometry.h"
#include "conv_gram_kernels.cuh"

namespace {

using sap_fast::cuda::ConvGramShape;

// The schema's argument checks (shared with the CPU kernels), then the 3-D shape (leading size-1
// dims for 1-D/2-D convs) that the kernels work on, and the limits of the CUDA grid.
ConvGramShape conv_gram_shape(const at::Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef stride,
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
  TORCH_CHECK(sap_fast::cuda::conv_gram_grid_fits(s, sap_fast::cuda::DefaultGramTiling::kTile),
              "conv_gram: Gram width d = ", s.width, " is too large for the CUDA kernel's grid");
  return s;
}

template <typename scalar_t, typename acc_t>
void launch(const at::Tensor& x, at::Tensor& gram, const ConvGramShape& s, int sm_count, cudaStream_t stream) {
  acc_t* out = gram.mutable_data_ptr<acc_t>();
  sap_fast::cuda::launch_conv_gram_tiles<scalar_t, acc_t>(x.const_data_ptr<scalar_t>(), out, s, sm_count, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  sap_fast::cuda::launch_mirror_upper_to_lower<acc_t>(out, s.width, s.groups, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor conv_gram_cuda(const at::Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, at::ScalarType dtype) {
  TORCH_CHECK(x.is_cuda(), "conv_gram (CUDA): x must be a CUDA tensor, got ", x.device());
  const ConvGramShape s = conv_gram_shape(x, kernel_size, stride, padding, dilation, groups, dtype);
  const c10::cuda::CUDAGuard device_guard(x.device());
  // G is a sum into zeros: the tile kernel adds its partial tiles with atomicAdd.
  at::Tensor gram = at::zeros({s.groups, s.width, s.width}, x.options().dtype(dtype));
  if (s.rows == 0 || s.width == 0) return gram;  // no rows (N = 0) or no columns (C = 0): G = 0

  const at::Tensor xc = x.contiguous();
  int sm_count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, x.get_device()));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();

  const bool x_double = xc.scalar_type() == at::kDouble;
  const bool acc_double = dtype == at::kDouble;
  if (!x_double && acc_double) {
    launch<float, double>(xc, gram, s, sm_count, stream);
  } else if (!x_double) {
    launch<float, float>(xc, gram, s, sm_count, stream);
  } else if (acc_double) {
    launch<double, double>(xc, gram, s, sm_count, stream);
  } else {
    launch<double, float>(xc, gram, s, sm_count, stream);
  }
  return gram;
}

}  // namespace

TORCH_LIBRARY_IMPL(sap_fast, CUDA, m) { m.impl("conv_gram", &conv_gram_cuda); }
