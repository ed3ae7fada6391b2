// Shapes of a conv's patch matrix R, checked once for every conv_gram kernel (CPU and CUDA).
#pragma once

#include <ATen/core/Tensor.h>  // not ATen/ATen.h: the CUDA files build with method operators only

#include <vector>

namespace sap_fast {

struct ConvGeometry {
  int64_t batch = 0, channels = 0, groups = 1, group_channels = 0;
  std::vector<int64_t> input, kernel, stride, padding, dilation, output;  // one entry per spatial dim
  int64_t taps = 1;       // prod(kernel): patch entries per channel
  int64_t width = 0;      // d = group_channels * taps, the Gram's size
  int64_t positions = 1;  // prod(output): rows of R per sample

  int64_t spatial() const { return static_cast<int64_t>(input.size()); }
};

// Validates the op's arguments with one-line, actionable messages and derives the geometry.
inline ConvGeometry conv_geometry(const at::Tensor& x, at::IntArrayRef kernel_size,
                                  at::IntArrayRef stride, at::IntArrayRef padding,
                                  at::IntArrayRef dilation, int64_t groups, at::ScalarType dtype,
                                  const char* op) {
  TORCH_CHECK(x.dim() >= 3 && x.dim() <= 5, op, ": x must be (N, C, *spatial) with 1 to 3 spatial "
              "dims, got shape ", x.sizes(), "; add a batch dim with x.unsqueeze(0) for unbatched input");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              ": x must be float32 or float64, got ", x.scalar_type(), "; convert it with .float()");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, op,
              ": dtype (accumulation) must be float32 or float64, got ", dtype);
  const int64_t spatial = x.dim() - 2;
  TORCH_CHECK(static_cast<int64_t>(kernel_size.size()) == spatial &&
                  static_cast<int64_t>(stride.size()) == spatial &&
                  static_cast<int64_t>(padding.size()) == spatial &&
                  static_cast<int64_t>(dilation.size()) == spatial,
              op, ": kernel_size, stride, padding and dilation need ", spatial,
              " entries each (one per spatial dim of x)");
  TORCH_CHECK(groups >= 1 && x.size(1) % groups == 0, op, ": groups=", groups,
              " must be positive and divide the ", x.size(1), " input channels");
  ConvGeometry g;
  g.batch = x.size(0);
  g.channels = x.size(1);
  g.groups = groups;
  g.group_channels = g.channels / groups;
  for (int64_t i = 0; i < spatial; ++i) {
    TORCH_CHECK(kernel_size[i] > 0 && stride[i] > 0 && dilation[i] > 0 && padding[i] >= 0, op,
                ": kernel_size, stride and dilation must be positive and padding non-negative "
                "(dim ", i, ")");
    const int64_t span = dilation[i] * (kernel_size[i] - 1) + 1;
    const int64_t padded = x.size(2 + i) + 2 * padding[i];
    TORCH_CHECK(padded >= span, op, ": spatial dim ", i, " has size ", x.size(2 + i),
                " (padded ", padded, "), smaller than the dilated kernel (", span,
                "); the conv has no output");
    g.input.push_back(x.size(2 + i));
    g.kernel.push_back(kernel_size[i]);
    g.stride.push_back(stride[i]);
    g.padding.push_back(padding[i]);
    g.dilation.push_back(dilation[i]);
    g.output.push_back((padded - span) / stride[i] + 1);
    g.taps *= kernel_size[i];
    g.positions *= g.output.back();
  }
  g.width = g.group_channels * g.taps;
  return g;
}

}  // namespace sap_fast
