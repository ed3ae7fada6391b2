// Implicit-im2col Gram kernels for Conv1d/2d/3d (grouped too): G = Σ_rows rᵀr per group, where a
// row r of the patch matrix R is one (sample, output position) and R is never stored.
//
// Only CUDA runtime headers here (no torch), so the file compile-checks in a second and can be
// reused from any binding. Two compilers read it:
//   nvcc    through csrc/cuda/conv_gram.cu, the torch-facing launcher of the CMake build;
//   NVRTC   at run time through cupy (sap_fast/backends/nvrtc.py), on machines with torch from a
//           wheel and no CUDA toolkit. NVRTC has no host headers (no cuda_runtime.h, no <cstdint>)
//           and compiles device code only, so the includes and the host-side launchers at the end
//           are guarded by __CUDACC_RTC__; the Python launcher mirrors those launchers (grid,
//           split-K, mirror) and tools/check_cuda.sh compiles the file both ways.
//
// Layout. x is a contiguous (N, C, D, H, W) tensor (1-D and 2-D convs pass size-1 leading spatial
// dims and size-1 kernels). Group g owns channels [g·Cg, (g+1)·Cg). The Gram is (groups, d, d)
// with d = Cg·kd·kh·kw and column index c·(kd·kh·kw) + (a·kh + b)·kw + e, the order of
// weight.view(out, -1).
//
// Work split (see conv_gram_tile_kernel):
//   blockIdx.x  one BM×BN tile (BM = BN) on or above the diagonal of G: the Gram is symmetric,
//               so the lower tiles are never computed (about half the work) and
//               mirror_upper_to_lower_kernel copies them over at the end;
//   blockIdx.y  the group;
//   blockIdx.z  a contiguous range of rows (split-K); the partial tiles meet through atomicAdd
//               in a zeroed G (fp64 atomicAdd needs sm_60+, CUDA 13 builds sm_75+ only).
// Each block walks its rows in chunks of BK: the two BK×BM slabs of R that its tile needs are
// gathered from x straight into shared memory (zero padding by bounds checks, no padded copy),
// converted to the accumulation type there, and multiplied as an outer-product update by a
// 16×16 thread grid, each thread owning a 4×4 sub-tile in registers.
//
// This is the clear, correct baseline; the H100 tuning (tensor cores, double buffering, cheaper
// row decomposition, shift trick for stride-1 3×3) comes later and should keep the contract.
#pragma once

#ifndef __CUDACC_RTC__
#include <cuda_runtime.h>

#include <cstdint>
#endif

namespace sap_fast::cuda {

#ifdef __CUDACC_RTC__
// NVRTC has no <cstdint>: the one fixed-width type used below, from a built-in type of the same
// width, declared inside this namespace so it can clash with nothing a caller defines.
using int64_t = long long;
#endif

// Everything the kernels need to know about one conv_gram call. Sizes are int64 because
// N·positions·C can exceed 2^31 (activations of a large batch), and offsets are built from them.
struct ConvGramShape {
  int64_t batch;           // N
  int64_t channels;        // C, all groups
  int64_t groups;
  int64_t group_channels;  // Cg = C / groups
  int64_t in_size[3];      // D, H, W of x (before padding)
  int64_t out_size[3];     // Do, Ho, Wo of the conv output
  int64_t kernel[3];       // kd, kh, kw
  int64_t stride[3];
  int64_t padding[3];      // zeros on both sides
  int64_t dilation[3];
  int64_t taps;            // kd·kh·kw, patch elements per channel
  int64_t width;           // d = Cg·taps, the side of each group's Gram
  int64_t positions;       // Do·Ho·Wo, rows per sample
  int64_t rows;            // N·positions, rows of R
};

// Tile geometry, a compile-time choice so the register tile fully unrolls.
//   kTile            BM = BN; square so the tile grid has a diagonal to fold on.
//   kChunk           BK, rows of R staged through shared memory per step.
//   kThreadsPerDim   the block is kThreadsPerDim² threads; each owns a kPerThread² sub-tile.
template <int kTile_, int kChunk_, int kThreadsPerDim_>
struct GramTiling {
  static constexpr int kTile = kTile_;
  static constexpr int kChunk = kChunk_;
  static constexpr int kThreadsPerDim = kThreadsPerDim_;
  static constexpr int kThreads = kThreadsPerDim * kThreadsPerDim;
  static constexpr int kPerThread = kTile / kThreadsPerDim;
  // When loading, thread t gathers row (t mod kChunk) of the chunk for kTile/kColsPerLoad columns,
  // so neighbouring threads read neighbouring output positions (coalesced for stride 1) and
  // each thread decomposes a single row index per chunk.
  static constexpr int kColsPerLoad = kThreads / kChunk;
  static constexpr int kLoadsPerThread = kTile / kColsPerLoad;

  static_assert(kTile % kThreadsPerDim == 0, "kTile must be a multiple of kThreadsPerDim");
  static_assert(kThreads % kChunk == 0, "the block must load whole chunk rows");
  static_assert(kTile % kColsPerLoad == 0, "the block must load whole tile columns");
  static_assert(kThreads <= 1024, "at most 1024 threads per block");
};

using DefaultGramTiling = GramTiling<64, 16, 16>;

// Where one Gram column reads x: its channel's offset within a sample and its kernel tap's
// displacement per spatial dim (dilation applied). channel_offset < 0 marks a column past d
// (a ragged last tile), which reads as zero.
struct ColumnTap {
  int64_t channel_offset;
  int64_t displacement[3];
};

__host__ __device__ inline ColumnTap make_column_tap(const ConvGramShape& s, int64_t group, int64_t col) {
  ColumnTap tap{-1, {0, 0, 0}};
  if (col < 0 || col >= s.width) return tap;
  const int64_t channel = col / s.taps;
  const int64_t tap_index = col - channel * s.taps;
  const int64_t a = tap_index / (s.kernel[1] * s.kernel[2]);
  const int64_t b = (tap_index / s.kernel[2]) % s.kernel[1];
  const int64_t e = tap_index % s.kernel[2];
  tap.channel_offset = (group * s.group_channels + channel) * (s.in_size[0] * s.in_size[1] * s.in_size[2]);
  tap.displacement[0] = a * s.dilation[0];
  tap.displacement[1] = b * s.dilation[1];
  tap.displacement[2] = e * s.dilation[2];
  return tap;
}

// Where one row of R starts reading x: the sample's offset and the top-left-front corner of its
// receptive field (may be negative: padding). sample_offset < 0 marks a row past the end.
struct RowOrigin {
  int64_t sample_offset;
  int64_t corner[3];
};

__host__ __device__ inline RowOrigin make_row_origin(const ConvGramShape& s, int64_t row, int64_t row_end) {
  RowOrigin origin{-1, {0, 0, 0}};
  if (row < 0 || row >= row_end) return origin;
  const int64_t sample = row / s.positions;
  int64_t position = row - sample * s.positions;  // row-major over (Do, Ho, Wo)
  const int64_t ow = position % s.out_size[2];
  position /= s.out_size[2];
  const int64_t oh = position % s.out_size[1];
  const int64_t od = position / s.out_size[1];
  origin.sample_offset = sample * s.channels * (s.in_size[0] * s.in_size[1] * s.in_size[2]);
  origin.corner[0] = od * s.stride[0] - s.padding[0];
  origin.corner[1] = oh * s.stride[1] - s.padding[1];
  origin.corner[2] = ow * s.stride[2] - s.padding[2];
  return origin;
}

// R[row, col] read from x: zero outside the input (the conv's zero padding) and for the
// out-of-range rows/columns of ragged tiles, so those add nothing to G.
template <typename scalar_t, typename acc_t>
__host__ __device__ inline acc_t patch_value(const scalar_t* x, const ConvGramShape& s, const RowOrigin& origin,
                                             const ColumnTap& tap) {
  if (origin.sample_offset < 0 || tap.channel_offset < 0) return acc_t(0);
  const int64_t id = origin.corner[0] + tap.displacement[0];
  const int64_t ih = origin.corner[1] + tap.displacement[1];
  const int64_t iw = origin.corner[2] + tap.displacement[2];
  if (id < 0 || id >= s.in_size[0] || ih < 0 || ih >= s.in_size[1] || iw < 0 || iw >= s.in_size[2]) {
    return acc_t(0);
  }
  const int64_t spatial = (id * s.in_size[1] + ih) * s.in_size[2] + iw;
  return static_cast<acc_t>(x[origin.sample_offset + tap.channel_offset + spatial]);
}

// blockIdx.x → (tile_row, tile_col) with tile_row ≤ tile_col, enumerating the upper triangle row
// by row: row t holds tiles - t pairs. A loop (≤ tiles steps, once per block) rather than a
// square-root formula, which can round wrongly for large tile counts.
__host__ __device__ inline void upper_tile_pair(int64_t index, int64_t tiles, int64_t* tile_row, int64_t* tile_col) {
  int64_t row = 0;
  while (index >= tiles - row) {
    index -= tiles - row;
    ++row;
  }
  *tile_row = row;
  *tile_col = row + index;
}

__host__ __device__ inline int64_t upper_tile_count(int64_t tiles) { return tiles * (tiles + 1) / 2; }

// One upper-triangle tile of one group's Gram, over the rows [blockIdx.z·rows_per_split, +rows_per_split),
// added into `gram` (zeroed by the caller). Diagonal tiles add only their upper half, so the
// mirror kernel alone defines the lower triangle and G comes out exactly symmetric.
template <typename scalar_t, typename acc_t, typename Tiling>
__global__ void __launch_bounds__(Tiling::kThreads)
    conv_gram_tile_kernel(const scalar_t* __restrict__ x, acc_t* __restrict__ gram, ConvGramShape s,
                          int64_t rows_per_split) {
  constexpr int kTile = Tiling::kTile;
  constexpr int kChunk = Tiling::kChunk;
  constexpr int kThreadsPerDim = Tiling::kThreadsPerDim;
  constexpr int kPerThread = Tiling::kPerThread;

  const int64_t tiles = (s.width + kTile - 1) / kTile;
  int64_t tile_row, tile_col;
  upper_tile_pair(blockIdx.x, tiles, &tile_row, &tile_col);
  const bool diagonal = tile_row == tile_col;
  const int64_t group = blockIdx.y;
  const int64_t row_begin = static_cast<int64_t>(blockIdx.z) * rows_per_split;
  const int64_t row_end = row_begin + rows_per_split < s.rows ? row_begin + rows_per_split : s.rows;
  if (row_begin >= row_end) return;  // the launcher sizes the grid so this does not happen

  // +1 column of padding: the loaders write down a column, which would otherwise hit one bank.
  __shared__ acc_t row_slab[kChunk][kTile + 1];  // R[chunk rows, tile_row's columns]
  __shared__ acc_t col_slab[kChunk][kTile + 1];  // R[chunk rows, tile_col's columns]; unused on the diagonal
  __shared__ ColumnTap taps[2][kTile];           // [0]: tile_row's columns, [1]: tile_col's

  const int tid = threadIdx.y * kThreadsPerDim + threadIdx.x;
  for (int i = tid; i < 2 * kTile; i += Tiling::kThreads) {
    const int side = i / kTile;
    const int local = i % kTile;
    taps[side][local] = make_column_tap(s, group, (side == 0 ? tile_row : tile_col) * kTile + local);
  }
  __syncthreads();

  acc_t acc[kPerThread][kPerThread];
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) acc[i][j] = acc_t(0);
  }

  const int load_row = tid % kChunk;
  const int load_col = tid / kChunk;
  // The diagonal tile multiplies a slab by itself: load it once.
  acc_t (*const right_slab)[kTile + 1] = diagonal ? row_slab : col_slab;

  for (int64_t chunk = row_begin; chunk < row_end; chunk += kChunk) {
    const RowOrigin origin = make_row_origin(s, chunk + load_row, row_end);
#pragma unroll
    for (int l = 0; l < Tiling::kLoadsPerThread; ++l) {
      const int col = load_col + l * Tiling::kColsPerLoad;
      row_slab[load_row][col] = patch_value<scalar_t, acc_t>(x, s, origin, taps[0][col]);
      if (!diagonal) col_slab[load_row][col] = patch_value<scalar_t, acc_t>(x, s, origin, taps[1][col]);
    }
    __syncthreads();

#pragma unroll
    for (int k = 0; k < kChunk; ++k) {
      // Strided ownership (threadIdx + i·kThreadsPerDim): a warp reads consecutive words of
      // right_slab and at most two words of row_slab, so no bank conflicts.
      acc_t left[kPerThread], right[kPerThread];
#pragma unroll
      for (int i = 0; i < kPerThread; ++i) left[i] = row_slab[k][threadIdx.y + i * kThreadsPerDim];
#pragma unroll
      for (int j = 0; j < kPerThread; ++j) right[j] = right_slab[k][threadIdx.x + j * kThreadsPerDim];
#pragma unroll
      for (int i = 0; i < kPerThread; ++i) {
#pragma unroll
        for (int j = 0; j < kPerThread; ++j) acc[i][j] += left[i] * right[j];
      }
    }
    __syncthreads();  // the slabs are overwritten by the next chunk
  }

  acc_t* group_gram = gram + group * s.width * s.width;
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int64_t r = tile_row * kTile + threadIdx.y + i * kThreadsPerDim;
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      const int64_t c = tile_col * kTile + threadIdx.x + j * kThreadsPerDim;
      if (r < s.width && c < s.width && r <= c) atomicAdd(group_gram + r * s.width + c, acc[i][j]);
    }
  }
}

// G[g, r, c] = G[g, c, r] for r > c: completes the Gram from its upper triangle. O(d²) against
// the tile kernel's O(rows·d²), so a plain grid-stride loop is enough.
template <typename acc_t>
__global__ void mirror_upper_to_lower_kernel(acc_t* __restrict__ gram, int64_t width, int64_t matrices) {
  const int64_t per_matrix = width * width;
  const int64_t total = matrices * per_matrix;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t matrix = idx / per_matrix;
    const int64_t within = idx - matrix * per_matrix;
    const int64_t r = within / width;
    const int64_t c = within - r * width;
    if (r > c) gram[idx] = gram[matrix * per_matrix + c * width + r];
  }
}

// ---------------------------------------------------------------------------------------------
// Host-side launch functions (no torch): the caller zeroes `gram`, launches the tiles, then the
// mirror, on one stream, checking each launch. Not for NVRTC (device code only, no <<<>>>):
// sap_fast/backends/nvrtc.py launches the same kernels with the same grid, and keeps a copy of
// choose_rows_per_split and conv_gram_grid_fits that must change with them.
// ---------------------------------------------------------------------------------------------
#ifndef __CUDACC_RTC__

// Row ranges per tile (split-K). Enough blocks to fill the GPU a few times over, but never a
// range so short that the atomicAdds of its tile outweigh its multiply-adds.
inline int64_t choose_rows_per_split(int64_t tile_blocks, int64_t rows, int sm_count, int chunk) {
  constexpr int64_t kBlocksPerSm = 4;
  constexpr int64_t kMinChunksPerSplit = 32;
  constexpr int64_t kMaxSplits = 65535;  // gridDim.z limit
  const int64_t wanted_blocks = kBlocksPerSm * (sm_count > 0 ? sm_count : 1);
  int64_t splits = (wanted_blocks + tile_blocks - 1) / tile_blocks;
  const int64_t max_useful = rows / (kMinChunksPerSplit * chunk);
  if (splits > max_useful) splits = max_useful;
  if (splits > kMaxSplits) splits = kMaxSplits;
  if (splits < 1) splits = 1;
  int64_t rows_per_split = (rows + splits - 1) / splits;
  // Whole chunks per split. Rounding up can only lower the split count (the grid then uses
  // ceil(rows / rows_per_split) splits, none empty).
  return (rows_per_split + chunk - 1) / chunk * chunk;
}

template <typename Tiling>
inline dim3 conv_gram_tile_grid(const ConvGramShape& s, int64_t rows_per_split) {
  const int64_t tiles = (s.width + Tiling::kTile - 1) / Tiling::kTile;
  const int64_t splits = (s.rows + rows_per_split - 1) / rows_per_split;
  return dim3(static_cast<unsigned>(upper_tile_count(tiles)), static_cast<unsigned>(s.groups),
              static_cast<unsigned>(splits));
}

// Whether the launch grid can hold this shape: groups on gridDim.y (≤ 65535), upper tiles on
// gridDim.x (< 2^31).
inline bool conv_gram_grid_fits(const ConvGramShape& s, int tile) {
  const int64_t tiles = (s.width + tile - 1) / tile;
  return s.groups <= 65535 && upper_tile_count(tiles) <= 2147483647LL;
}

template <typename scalar_t, typename acc_t, typename Tiling = DefaultGramTiling>
inline void launch_conv_gram_tiles(const scalar_t* x, acc_t* gram, const ConvGramShape& s, int sm_count,
                                   cudaStream_t stream) {
  const int64_t tiles = (s.width + Tiling::kTile - 1) / Tiling::kTile;
  const int64_t tile_blocks = upper_tile_count(tiles) * s.groups;
  const int64_t rows_per_split = choose_rows_per_split(tile_blocks, s.rows, sm_count, Tiling::kChunk);
  const dim3 grid = conv_gram_tile_grid<Tiling>(s, rows_per_split);
  const dim3 block(Tiling::kThreadsPerDim, Tiling::kThreadsPerDim);
  conv_gram_tile_kernel<scalar_t, acc_t, Tiling><<<grid, block, 0, stream>>>(x, gram, s, rows_per_split);
}

template <typename acc_t>
inline void launch_mirror_upper_to_lower(acc_t* gram, int64_t width, int64_t matrices, cudaStream_t stream) {
  constexpr int kThreads = 256;
  const int64_t total = matrices * width * width;
  const int64_t wanted = (total + kThreads - 1) / kThreads;
  const unsigned blocks = static_cast<unsigned>(wanted < 65535 ? (wanted > 0 ? wanted : 1) : 65535);
  mirror_upper_to_lower_kernel<acc_t><<<blocks, kThreads, 0, stream>>>(gram, width, matrices);
}

#endif  // __CUDACC_RTC__

}  // namespace sap_fast::cuda
