// CUDA kernel of sap_fast::conv_gram (schema in csrc/sap_fast.cpp): checks the arguments, views
// 1-D/2-D convs as 3-D ones with size-1 dims, and launches the implicit-im2col Gram kernels of
// conv_gram_kernels.cuh on the caller's current stream: a float64 G on the FP64 tensor cores of
// sm_80 and later (conv_gram_dmma_kernel), everything else on the FMA tiles (conv_gram_tile_kernel).
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
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "conv_gram_kernels.cuh"
#include "conv_gram_shape.h"

namespace {

using sap_fast::cuda::ConvGramShape;
using sap_fast::cuda::conv_gram_shape;

// SAP_FAST_GRAM_DMMA: "auto" (default, also "1"/"on") puts float64 Grams on the FP64 tensor
// cores of devices of compute capability 8.0 and later; "0"/"off" keeps the FMA tiles there too
// (to time the two, or to test the older path on a newer GPU). sap_fast/backends/nvrtc.py reads
// the same switch.
bool dmma_allowed() {
  const char* value = std::getenv("SAP_FAST_GRAM_DMMA");
  if (value == nullptr || *value == '\0' || !std::strcmp(value, "auto") || !std::strcmp(value, "1") ||
      !std::strcmp(value, "on")) {
    return true;
  }
  TORCH_CHECK(!std::strcmp(value, "0") || !std::strcmp(value, "off"), "SAP_FAST_GRAM_DMMA='", value,
              "': use auto, 0 or 1");
  return false;
}

bool use_dmma(int device) {
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  return major >= 8 && dmma_allowed();
}

// The tiles (on tensor cores where `dmma` and G is float64), then the mirror.
template <typename scalar_t, typename acc_t>
void launch(const at::Tensor& x, at::Tensor& gram, const ConvGramShape& s, int sm_count, bool dmma,
            cudaStream_t stream) {
  acc_t* out = gram.mutable_data_ptr<acc_t>();
  if constexpr (std::is_same_v<acc_t, double>) {
    if (dmma) {
      sap_fast::cuda::launch_conv_gram_dmma_tiles<scalar_t>(x.const_data_ptr<scalar_t>(), out, s, sm_count, stream);
    } else {
      sap_fast::cuda::launch_conv_gram_tiles<scalar_t, acc_t>(x.const_data_ptr<scalar_t>(), out, s, sm_count, stream);
    }
  } else {
    sap_fast::cuda::launch_conv_gram_tiles<scalar_t, acc_t>(x.const_data_ptr<scalar_t>(), out, s, sm_count, stream);
  }
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
  const bool dmma = acc_double && use_dmma(x.get_device());
  if (!x_double && acc_double) {
    launch<float, double>(xc, gram, s, sm_count, dmma, stream);
  } else if (!x_double) {
    launch<float, float>(xc, gram, s, sm_count, dmma, stream);
  } else if (acc_double) {
    launch<double, double>(xc, gram, s, sm_count, dmma, stream);
  } else {
    launch<double, float>(xc, gram, s, sm_count, dmma, stream);
  }
  return gram;
}

}  // namespace

TORCH_LIBRARY_IMPL(sap_fast, CUDA, m) { m.impl("conv_gram", &conv_gram_cuda); }
