// CPU twin of the CUDA conv Gram's FP64 tensor-core tiles (conv_gram_dmma_kernel in
// csrc/cuda/conv_gram_kernels.cuh): sap_fast::conv_gram_dmma_twin runs that kernel's grid block by
// block and its 8 warps lane by lane, through the kernel's own index code (tile_block,
// load_column_taps, DmmaTiles::gather_chunk / load_fragments / cell_row / cell_col, upper_cell,
// tile_grid_size), compiled here by g++, on the split-K ranges of a launch plan (rows_per_split,
// from sap_fast.backends.conv_launch.plan, checked as the CUDA launch op checks it). Only the m8n8k4 product is the CPU's: mma_m8n8k4
// below, written from the PTX ISA's fragment layout on its own, so a wrong fragment index in the
// shared code shows as a wrong Gram. tests/backends/test_dmma_twin.py holds it to the float64
// oracle; a GPU holds the kernel to the same tests (tests/backends/test_cuda_ops.py).
//
// Not a route: the statistics pass never calls it (it is as slow as emulating a GPU sounds).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "cuda/conv_gram_shape.h"

namespace sap_fast {
namespace {

using Tiling = cuda::DefaultGramTiling;
using Tiles = cuda::DmmaTiles<Tiling>;
constexpr int kLanes = Tiles::kWarpSize;

// mma.sync.aligned.m8n8k4.row.col.f64.f64.f64.f64 d, a, b, c with d = c for one warp. From the
// PTX ISA ("Matrix Fragments for mma.m8n8k4 with .f64"), groupID = lane >> 2 and
// threadID_in_group = lane % 4: lane l holds a = A[l >> 2][l % 4] of the 8×4 A, b = B[l % 4][l >> 2]
// of the 4×8 B, and c[i] = C[l >> 2][2·(l % 4) + i] of the 8×8 C (i = 0, 1).
void mma_m8n8k4(const double (&a)[kLanes], const double (&b)[kLanes], double (&c)[kLanes][2]) {
  double A[8][4], B[4][8], C[8][8];
  for (int lane = 0; lane < kLanes; ++lane) {
    A[lane >> 2][lane % 4] = a[lane];
    B[lane % 4][lane >> 2] = b[lane];
    for (int i = 0; i < 2; ++i) C[lane >> 2][2 * (lane % 4) + i] = c[lane][i];
  }
  for (int m = 0; m < 8; ++m) {
    for (int n = 0; n < 8; ++n) {
      for (int k = 0; k < 4; ++k) C[m][n] = std::fma(A[m][k], B[k][n], C[m][n]);
    }
  }
  for (int lane = 0; lane < kLanes; ++lane) {
    for (int i = 0; i < 2; ++i) c[lane][i] = C[lane >> 2][2 * (lane % 4) + i];
  }
}

// The registers of one block: acc[warp][lane][mi][nj][i], as each thread of the kernel holds its
// acc[mi][nj][i].
struct Accumulators {
  std::vector<double> values = std::vector<double>(Tiles::kWarps * kLanes * Tiles::kFragsM * Tiles::kFragsN * 2);
  double& at(int warp, int lane, int mi, int nj, int i) {
    return values[(((warp * kLanes + lane) * Tiles::kFragsM + mi) * Tiles::kFragsN + nj) * 2 + i];
  }
};

// One block of conv_gram_dmma_kernel: the same steps in the same order, threads one after another
// between the barriers, warps one after another at each mma.
template <typename scalar_t>
void run_block(const scalar_t* x, double* gram, const cuda::ConvGramShape& s, const cuda::TileBlock& block) {
  if (block.row_begin >= block.row_end) return;
  std::vector<double> row_slab(Tiles::kSlabSize), col_slab(Tiles::kSlabSize);
  cuda::ColumnTap taps[2][Tiling::kTile];
  for (int tid = 0; tid < Tiling::kThreads; ++tid) cuda::load_column_taps<Tiling>(s, block, tid, taps);

  Accumulators acc;
  const double* right = block.diagonal ? row_slab.data() : col_slab.data();
  for (int64_t chunk = block.row_begin; chunk < block.row_end; chunk += Tiling::kChunk) {
    for (int tid = 0; tid < Tiling::kThreads; ++tid) {
      Tiles::gather_chunk(x, s, taps[0], taps[1], chunk, block.row_end, block.diagonal, tid, row_slab.data(),
                          col_slab.data());
    }
    for (int step = 0; step < Tiles::kSteps; ++step) {
      for (int warp = 0; warp < Tiles::kWarps; ++warp) {
        double a[kLanes][Tiles::kFragsM], b[kLanes][Tiles::kFragsN];
        for (int lane = 0; lane < kLanes; ++lane) {
          Tiles::load_fragments(row_slab.data(), right, warp, lane, step, a[lane], b[lane]);
        }
        for (int mi = 0; mi < Tiles::kFragsM; ++mi) {
          for (int nj = 0; nj < Tiles::kFragsN; ++nj) {
            double a_mma[kLanes], b_mma[kLanes], c_mma[kLanes][2];
            for (int lane = 0; lane < kLanes; ++lane) {
              a_mma[lane] = a[lane][mi];
              b_mma[lane] = b[lane][nj];
              for (int i = 0; i < 2; ++i) c_mma[lane][i] = acc.at(warp, lane, mi, nj, i);
            }
            mma_m8n8k4(a_mma, b_mma, c_mma);
            for (int lane = 0; lane < kLanes; ++lane) {
              for (int i = 0; i < 2; ++i) acc.at(warp, lane, mi, nj, i) = c_mma[lane][i];
            }
          }
        }
      }
    }
  }

  double* group_gram = gram + block.group * s.width * s.width;
  for (int warp = 0; warp < Tiles::kWarps; ++warp) {
    for (int lane = 0; lane < kLanes; ++lane) {
      for (int mi = 0; mi < Tiles::kFragsM; ++mi) {
        const int64_t r = block.tile_row * Tiling::kTile + Tiles::cell_row(warp, lane, mi);
        for (int nj = 0; nj < Tiles::kFragsN; ++nj) {
          for (int i = 0; i < 2; ++i) {
            const int64_t c = block.tile_col * Tiling::kTile + Tiles::cell_col(warp, lane, nj, i);
            if (cuda::upper_cell(s, r, c)) group_gram[r * s.width + c] += acc.at(warp, lane, mi, nj, i);
          }
        }
      }
    }
  }
}

// torch.ops.sap_fast.conv_gram(x, ..., torch.float64) as conv_gram_dmma_kernel computes it with
// ranges of rows_per_split rows (the launch plan's), then the mirror.
at::Tensor conv_gram_dmma_twin_cpu(const at::Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                   at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                   int64_t rows_per_split) {
  const cuda::ConvGramShape s = cuda::conv_gram_shape(x, kernel_size, stride, padding, dilation, groups, at::kDouble);
  cuda::conv_gram_splits(s, rows_per_split, "conv_gram_dmma_twin");
  at::Tensor gram = at::zeros({s.groups, s.width, s.width}, x.options().dtype(at::kDouble));
  if (s.rows == 0 || s.width == 0) return gram;
  const at::Tensor xc = x.contiguous();
  int64_t grid[3];
  cuda::tile_grid_size<Tiling>(s, rows_per_split, grid);
  double* out = gram.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "conv_gram_dmma_twin", [&] {
    const scalar_t* in = xc.const_data_ptr<scalar_t>();
    // Blocks of different tiles or groups write different cells: in parallel over those, the
    // split-K ranges of one tile one after another (the kernel's atomicAdds, in some order).
    at::parallel_for(0, grid[0] * grid[1], 1, [&](int64_t begin, int64_t end) {
      for (int64_t tile_group = begin; tile_group < end; ++tile_group) {
        for (int64_t z = 0; z < grid[2]; ++z) {
          const cuda::TileBlock block =
              cuda::tile_block(s, Tiling::kTile, rows_per_split, tile_group % grid[0], tile_group / grid[0], z);
          run_block(in, out, s, block);
        }
      }
    });
  });
  // mirror_upper_to_lower_kernel
  const int64_t width = s.width;
  for (int64_t g = 0; g < s.groups; ++g) {
    double* matrix = out + g * width * width;
    for (int64_t r = 1; r < width; ++r) {
      for (int64_t c = 0; c < r; ++c) matrix[r * width + c] = matrix[c * width + r];
    }
  }
  return gram;
}

}  // namespace

TORCH_LIBRARY_IMPL(sap_fast, CPU, m) { m.impl("conv_gram_dmma_twin", &conv_gram_dmma_twin_cpu); }

}  // namespace sap_fast
