// CPU Grams of a conv's patch matrix R without materialising R.
//
// conv_gram        implicit im2col over tiles: rows of R are gathered tile by tile (in parallel)
//                  into a small buffer in the accumulation dtype and added with one GEMM each.
//                  The statistics pass never routes a CPU call here (stride-1 convs take the
//                  shift form, the rest stream rows): this is the CPU twin of the CUDA kernel
//                  (csrc/cuda/conv_gram.cu, same schema and contract), kept so the op has a CPU
//                  implementation that tests/backends/test_native_cpu.py holds to the oracle and
//                  to opcheck, and that benchmarks/bench_native_cpu.py times as "tiled".
//                  benchmarks/cpu_conv_gram.py times it against the streamed rows on the convs
//                  the shift form does not serve (benchmarks/results/cpu-conv-gram.json): for a
//                  float64 Gram of float32 inputs it is faster and smaller on strided convs with
//                  a kernel larger than 1 (it never holds an unfolded chunk), slower on 1x1 convs
//                  (there unfold is a reshape and the rows a single GEMM).
// conv_gram_shift  stride-1 convs only: every block G[(c,i),(c',j)] depends on the two kernel
//                  offsets only through δ = o_j − o_i, up to the image border. So the Gram is
//                  assembled from the (2k−1)^n channel cross-correlations
//                      C_δ = Σ_{q, q+δ in image} x(q) x(q+δ)ᵀ        (C_{−δ} = C_δᵀ)
//                  minus, per offset pair, the thin border strips where q lies in the image but
//                  the output grid shifted by o_i does not reach it. Exact (no approximation);
//                  about 3.2x fewer multiply-adds than the k⁴ offset pairs for 3×3 kernels.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <map>
#include <vector>

#include "conv_geometry.h"

namespace sap_fast {
namespace {

constexpr int64_t kTileElements = int64_t(1) << 20;  // gathered rows per GEMM: 8 MB in float64

// Gathers rows [first, first + count) of R (all groups) into tile (groups, count, width).
template <typename in_t, typename acc_t>
void gather_rows(const ConvGeometry& g, const in_t* x, acc_t* tile, int64_t first, int64_t count) {
  const int64_t n_sp = g.spatial();
  // Pad the geometry to 3-D (size-1 leading dims) so one loop nest serves Conv1d/2d/3d.
  int64_t in[3] = {1, 1, 1}, k[3] = {1, 1, 1}, st[3] = {1, 1, 1}, pad[3] = {0, 0, 0},
          dil[3] = {1, 1, 1}, out[3] = {1, 1, 1};
  for (int64_t i = 0; i < n_sp; ++i) {
    const int64_t j = 3 - n_sp + i;
    in[j] = g.input[i], k[j] = g.kernel[i], st[j] = g.stride[i], pad[j] = g.padding[i],
    dil[j] = g.dilation[i], out[j] = g.output[i];
  }
  const int64_t plane = in[0] * in[1] * in[2];
  at::parallel_for(0, count, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t row = first + r;
      const int64_t sample = row / g.positions;
      int64_t pos = row % g.positions;
      const int64_t o2 = pos % out[2]; pos /= out[2];
      const int64_t o1 = pos % out[1];
      const int64_t o0 = pos / out[1];
      for (int64_t grp = 0; grp < g.groups; ++grp) {
        acc_t* dst = tile + (grp * count + r) * g.width;
        const in_t* src = x + (sample * g.channels + grp * g.group_channels) * plane;
        for (int64_t c = 0; c < g.group_channels; ++c, src += plane) {
          for (int64_t a = 0; a < k[0]; ++a) {
            const int64_t i0 = o0 * st[0] - pad[0] + a * dil[0];
            for (int64_t b = 0; b < k[1]; ++b) {
              const int64_t i1 = o1 * st[1] - pad[1] + b * dil[1];
              const bool inside01 = i0 >= 0 && i0 < in[0] && i1 >= 0 && i1 < in[1];
              const in_t* line = src + (i0 * in[1] + i1) * in[2];
              for (int64_t e = 0; e < k[2]; ++e) {
                const int64_t i2 = o2 * st[2] - pad[2] + e * dil[2];
                *dst++ = (inside01 && i2 >= 0 && i2 < in[2]) ? static_cast<acc_t>(line[i2]) : acc_t(0);
              }
            }
          }
        }
      }
    }
  });
}

at::Tensor conv_gram_cpu(const at::Tensor& x_in, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                         at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                         at::ScalarType dtype) {
  const ConvGeometry g = conv_geometry(x_in, kernel_size, stride, padding, dilation, groups, dtype,
                                       "sap_fast.conv_gram");
  const at::Tensor x = x_in.contiguous();
  auto options = x.options().dtype(dtype);
  at::Tensor gram = at::zeros({g.groups, g.width, g.width}, options);
  const int64_t total = g.batch * g.positions;
  const int64_t tile_rows = std::max<int64_t>(1, kTileElements / (g.groups * g.width));
  at::Tensor tile = at::empty({g.groups, std::min(tile_rows, std::max<int64_t>(total, 1)), g.width}, options);
  for (int64_t first = 0; first < total; first += tile_rows) {
    const int64_t count = std::min(tile_rows, total - first);
    at::Tensor rows = tile.flatten().narrow(0, 0, g.groups * count * g.width)
                          .view({g.groups, count, g.width});
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_gram_gather", [&] {
      using in_t = scalar_t;
      if (dtype == at::kDouble) {
        gather_rows<in_t, double>(g, x.data_ptr<in_t>(), rows.data_ptr<double>(), first, count);
      } else {
        gather_rows<in_t, float>(g, x.data_ptr<in_t>(), rows.data_ptr<float>(), first, count);
      }
    });
    gram.baddbmm_(rows.transpose(1, 2), rows);
  }
  return gram;
}

// ---- shift-correlation Gram (stride 1) -------------------------------------------------------

using Offset = std::vector<int64_t>;

struct Box {  // half-open box [lo, hi) of image coordinates
  Offset lo, hi;
  bool empty() const {
    for (size_t k = 0; k < lo.size(); ++k)
      if (hi[k] <= lo[k]) return true;
    return false;
  }
};

// S minus B as disjoint boxes (B ∩ S non-empty): peel off the parts of S outside B dim by dim.
std::vector<Box> box_difference(Box s, const Box& b) {
  std::vector<Box> parts;
  for (size_t k = 0; k < s.lo.size(); ++k) {
    if (s.lo[k] < b.lo[k]) {
      Box part = s;
      part.hi[k] = b.lo[k];
      parts.push_back(part);
    }
    if (s.hi[k] > b.hi[k]) {
      Box part = s;
      part.lo[k] = b.hi[k];
      parts.push_back(part);
    }
    s.lo[k] = std::max(s.lo[k], b.lo[k]);
    s.hi[k] = std::min(s.hi[k], b.hi[k]);
  }
  return parts;
}

// Σ over rows of aᵀb per group: a, b are (rows, C) with channels grouped contiguously.
at::Tensor grouped_cross(const at::Tensor& a, const at::Tensor& b, int64_t groups) {
  if (groups == 1) return at::mm(a.t(), b).unsqueeze(0);
  const int64_t rows = a.size(0), cg = a.size(1) / groups;
  return at::bmm(a.view({rows, groups, cg}).permute({1, 2, 0}), b.view({rows, groups, cg}).permute({1, 0, 2}));
}

class ShiftGram {
 public:
  ShiftGram(const ConvGeometry& g, const at::Tensor& x, at::ScalarType dtype) : g_(g) {
    const int64_t n_sp = g.spatial();
    // Channels-last buffer with a zero margin of the largest shift on every side of every
    // spatial dim: then one flat row offset per δ addresses x(q+δ) with no wrap-around.
    std::vector<int64_t> shape = {g.batch};
    for (int64_t k = 0; k < n_sp; ++k) {
      margin_.push_back(g.dilation[k] * (g.kernel[k] - 1));
      shape.push_back(g.input[k] + 2 * margin_[k]);
    }
    shape.push_back(g.channels);
    buffer_ = at::zeros(shape, x.options().dtype(dtype));
    image_ = buffer_;
    for (int64_t k = 0; k < n_sp; ++k) image_ = image_.narrow(1 + k, margin_[k], g.input[k]);
    image_.copy_(x.movedim(1, -1));  // layout change and dtype conversion in one pass
    flat_ = buffer_.view({-1, g.channels});
    // Flat rows [first_, first_ + span_) cover every image pixel (and margins between lines).
    first_ = 0;
    int64_t last = (g.batch - 1) * buffer_.stride(0);
    for (int64_t k = 0; k < n_sp; ++k) {
      first_ += margin_[k] * buffer_.stride(1 + k);
      last += (margin_[k] + g.input[k] - 1) * buffer_.stride(1 + k);
    }
    span_ = (last - first_) / g.channels + 1;
    first_ /= g.channels;
  }

  // G as (groups, width, width), column index c·taps + tap.
  at::Tensor gram() {
    const int64_t n_sp = g_.spatial(), taps = g_.taps, cg = g_.group_channels;
    std::vector<Offset> offsets;  // o_i = tap index · dilation, in tap order
    for (int64_t t = 0; t < taps; ++t) {
      Offset o(n_sp);
      for (int64_t k = n_sp - 1, rest = t; k >= 0; --k) {
        o[k] = (rest % g_.kernel[k]) * g_.dilation[k];
        rest /= g_.kernel[k];
      }
      offsets.push_back(o);
    }
    // Assembled tap-major, (groups, tap, c, tap', c'), so each block lands as whole rows; one
    // permuting copy at the end gives the weight's (c, tap) column order.
    at::Tensor blocks = at::empty({g_.groups, taps, cg, taps, cg}, buffer_.options());
    for (int64_t i = 0; i < taps; ++i) {
      for (int64_t j = i; j < taps; ++j) {
        Offset delta(n_sp);
        for (int64_t k = 0; k < n_sp; ++k) delta[k] = offsets[j][k] - offsets[i][k];
        at::Tensor block = pair_block(offsets[i], delta);
        blocks.select(3, j).select(1, i).copy_(block);
        if (i != j) blocks.select(3, i).select(1, j).copy_(block.transpose(1, 2));
      }
    }
    return blocks.permute({0, 2, 1, 4, 3}).reshape({g_.groups, g_.width, g_.width});
  }

 private:
  // Σ_{p in output grid} x(p + o_i − pad) x(p + o_i − pad + δ)ᵀ, per group.
  at::Tensor pair_block(const Offset& origin, const Offset& delta) {
    const int64_t n_sp = g_.spatial();
    Box support{Offset(n_sp), Offset(n_sp)}, reach{Offset(n_sp), Offset(n_sp)};
    for (int64_t k = 0; k < n_sp; ++k) {
      support.lo[k] = std::max<int64_t>(0, -delta[k]);  // q and q + δ in the image
      support.hi[k] = std::min(g_.input[k], g_.input[k] - delta[k]);
      reach.lo[k] = origin[k] - g_.padding[k];          // q = p + o_i − pad over the output grid
      reach.hi[k] = reach.lo[k] + g_.output[k];
    }
    Box both = support;
    for (int64_t k = 0; k < n_sp; ++k) {
      both.lo[k] = std::max(support.lo[k], reach.lo[k]);
      both.hi[k] = std::min(support.hi[k], reach.hi[k]);
    }
    const int64_t cg = g_.group_channels;
    if (both.empty()) return at::zeros({g_.groups, cg, cg}, buffer_.options());
    at::Tensor border;  // the part of C_δ outside this offset's reach
    for (const Box& strip : box_difference(support, both)) {
      at::Tensor part = box_cross(strip, delta);
      border = border.defined() ? border.add_(part) : part;
    }
    at::Tensor full = correlation(delta);
    return border.defined() ? full - border : full;
  }

  // C_δ per group, cached; C_{−δ} = C_δᵀ, so only lexicographically non-negative δ are computed.
  at::Tensor correlation(const Offset& delta) {
    Offset key = delta;
    bool flip = false;
    for (int64_t v : delta) {
      if (v != 0) {
        flip = v < 0;
        break;
      }
    }
    if (flip)
      for (auto& v : key) v = -v;
    auto found = cache_.find(key);
    if (found == cache_.end()) {
      // Two ways to the same sum. Over the margined flat buffer, C_δ is one GEMM on views with
      // no copy, but it also multiplies the zero margins between image lines; over the valid
      // box (q and q + δ both in the image) it copies both operands first. The copy is worth it
      // when the margins are a large share of the rows (small images, many channels).
      Box valid{Offset(key.size()), Offset(key.size())};
      int64_t valid_rows = g_.batch;
      for (size_t k = 0; k < key.size(); ++k) {
        valid.lo[k] = std::max<int64_t>(0, -key[k]);
        valid.hi[k] = std::min(g_.input[k], g_.input[k] - key[k]);
        valid_rows *= std::max<int64_t>(0, valid.hi[k] - valid.lo[k]);
      }
      // ~30 multiply-adds per copied element (measured, 2-core CPU): 2 copies vs cg MACs per row
      const double copy_cost = 60.0 / g_.group_channels;
      at::Tensor corr;
      if (valid_rows == 0) {
        corr = at::zeros({g_.groups, g_.group_channels, g_.group_channels}, buffer_.options());
      } else if (valid_rows * (1.0 + copy_cost) < static_cast<double>(span_)) {
        corr = box_cross(valid, key);
      } else {
        int64_t shift = 0;  // in flat rows
        for (size_t k = 0; k < key.size(); ++k) shift += key[k] * (buffer_.stride(1 + k) / g_.channels);
        corr = grouped_cross(flat_.narrow(0, first_, span_), flat_.narrow(0, first_ + shift, span_),
                             g_.groups);
      }
      found = cache_.emplace(key, corr).first;
    }
    return flip ? found->second.transpose(1, 2) : found->second;
  }

  // Σ_{q in box} x(q) x(q+δ)ᵀ per group (a thin border strip).
  at::Tensor box_cross(const Box& box, const Offset& delta) {
    at::Tensor a = image_, b = image_;
    for (int64_t k = 0; k < g_.spatial(); ++k) {
      a = a.narrow(1 + k, box.lo[k], box.hi[k] - box.lo[k]);
      b = b.narrow(1 + k, box.lo[k] + delta[k], box.hi[k] - box.lo[k]);
    }
    return grouped_cross(a.reshape({-1, g_.channels}), b.reshape({-1, g_.channels}), g_.groups);
  }

  const ConvGeometry& g_;
  Offset margin_;
  at::Tensor buffer_, image_, flat_;
  int64_t first_ = 0, span_ = 0;
  std::map<Offset, at::Tensor> cache_;
};

at::Tensor conv_gram_shift_cpu(const at::Tensor& x, at::IntArrayRef kernel_size,
                               at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                               at::ScalarType dtype) {
  const std::vector<int64_t> unit(kernel_size.size(), 1);
  const ConvGeometry g = conv_geometry(x, kernel_size, unit, padding, dilation, groups, dtype,
                                       "sap_fast.conv_gram_shift");
  return ShiftGram(g, x, dtype).gram();
}

}  // namespace

TORCH_LIBRARY_IMPL(sap_fast, CPU, m) {
  m.impl("conv_gram", &conv_gram_cpu);
  m.impl("conv_gram_shift", &conv_gram_shift_cpu);
}

}  // namespace sap_fast
