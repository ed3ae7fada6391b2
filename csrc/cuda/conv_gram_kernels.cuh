// Implicit-im2col Gram kernels for Conv1d/2d/3d (grouped too): G = Σ_rows rᵀr per group, where a
// row r of the patch matrix R is one (sample, output position) and R is never stored.
//
// Only CUDA runtime headers here (no torch), so the file compile-checks in a second and can be
// reused from any binding. Two compilers read it:
//   nvcc    through csrc/cuda/conv_gram.cu, the launch op of the CMake build;
//   NVRTC   at run time through cupy (sap_fast/backends/nvrtc.py), on machines with torch from a
//           wheel and no CUDA toolkit. NVRTC has no host headers (no cuda_runtime.h, no <cstdint>)
//           and compiles device code only, so the includes and the host-side grid helpers at the
//           end are guarded by __CUDACC_RTC__; tools/check_cuda.sh compiles the file both ways.
// Both launch from one plan, computed in Python (sap_fast/backends/conv_launch.py): which tile
// kernel, the split-K ranges (rows_per_split) and the mirror's grid.
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
// That kernel is the clear, correct baseline and the path of GPUs before sm_80. From sm_80 on, a
// float64 Gram takes conv_gram_dmma_kernel instead: the same tiles, grid, split-K and slabs, its
// product on the FP64 tensor cores (DMMA, mma.sync m8n8k4), 8 warps each owning a 32×16 block of
// the tile (see "FP64 tensor-core tiles" below). Neither kernel double-buffers its slabs; a change
// of the tiles (double buffering, a cheaper row decomposition, the shift trick for stride-1 3×3)
// keeps the contract above and the CPU twin's tests.
//
// A third compiler reads it: g++ (csrc/cpu/conv_gram_dmma_twin.cpp). The index code of the tiles
// is marked SAP_FAST_HD (__host__ __device__ under nvcc and NVRTC, nothing under g++), so the CPU
// twin of the tensor-core kernel runs the very loads, fragment indexing and stores of the device
// path, with the m8n8k4 product emulated lane by lane; the kernels are hidden from g++.
#pragma once

#ifndef __CUDACC_RTC__
#ifdef __CUDACC__
#include <cuda_runtime.h>
#endif

#include <cstdint>
#endif

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define SAP_FAST_HD __host__ __device__
#define SAP_FAST_UNROLL _Pragma("unroll")
#else
#define SAP_FAST_HD
#define SAP_FAST_UNROLL
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

SAP_FAST_HD inline ColumnTap make_column_tap(const ConvGramShape& s, int64_t group, int64_t col) {
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

SAP_FAST_HD inline RowOrigin make_row_origin(const ConvGramShape& s, int64_t row, int64_t row_end) {
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
SAP_FAST_HD inline acc_t patch_value(const scalar_t* x, const ConvGramShape& s, const RowOrigin& origin,
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
SAP_FAST_HD inline void upper_tile_pair(int64_t index, int64_t tiles, int64_t* tile_row, int64_t* tile_col) {
  int64_t row = 0;
  while (index >= tiles - row) {
    index -= tiles - row;
    ++row;
  }
  *tile_row = row;
  *tile_col = row + index;
}

SAP_FAST_HD inline int64_t upper_tile_count(int64_t tiles) { return tiles * (tiles + 1) / 2; }

// What one block of the tile grid computes: its upper-triangle tile (tile_row ≤ tile_col), its
// group and its range of rows [row_begin, row_end) (split-K). `block_x/y/z` are blockIdx.x/y/z.
struct TileBlock {
  int64_t tile_row, tile_col, group, row_begin, row_end;
  bool diagonal;
};

SAP_FAST_HD inline TileBlock tile_block(const ConvGramShape& s, int tile, int64_t rows_per_split, int64_t block_x,
                                        int64_t block_y, int64_t block_z) {
  TileBlock b{};
  upper_tile_pair(block_x, (s.width + tile - 1) / tile, &b.tile_row, &b.tile_col);
  b.diagonal = b.tile_row == b.tile_col;
  b.group = block_y;
  b.row_begin = block_z * rows_per_split;
  b.row_end = b.row_begin + rows_per_split < s.rows ? b.row_begin + rows_per_split : s.rows;
  return b;
}

// Thread tid's share of the block's column taps: taps[0] for tile_row's columns, taps[1] for
// tile_col's.
template <typename Tiling>
SAP_FAST_HD inline void load_column_taps(const ConvGramShape& s, const TileBlock& b, int tid,
                                         ColumnTap (*taps)[Tiling::kTile]) {
  constexpr int kTile = Tiling::kTile;
  for (int i = tid; i < 2 * kTile; i += Tiling::kThreads) {
    const int side = i / kTile;
    const int local = i % kTile;
    taps[side][local] = make_column_tap(s, b.group, (side == 0 ? b.tile_row : b.tile_col) * kTile + local);
  }
}

// Whether Gram cell (r, c) of a tile is added: inside the Gram and on or above its diagonal.
SAP_FAST_HD inline bool upper_cell(const ConvGramShape& s, int64_t r, int64_t c) {
  return r < s.width && c < s.width && r <= c;
}

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)

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

  const TileBlock block = tile_block(s, kTile, rows_per_split, blockIdx.x, blockIdx.y, blockIdx.z);
  const int64_t tile_row = block.tile_row, tile_col = block.tile_col, group = block.group;
  const int64_t row_begin = block.row_begin, row_end = block.row_end;
  const bool diagonal = block.diagonal;
  if (row_begin >= row_end) return;  // tile_grid_size's grid has no empty range

  // +1 column of padding: the loaders write down a column, which would otherwise hit one bank.
  __shared__ acc_t row_slab[kChunk][kTile + 1];  // R[chunk rows, tile_row's columns]
  __shared__ acc_t col_slab[kChunk][kTile + 1];  // R[chunk rows, tile_col's columns]; unused on the diagonal
  __shared__ ColumnTap taps[2][kTile];           // [0]: tile_row's columns, [1]: tile_col's

  const int tid = threadIdx.y * kThreadsPerDim + threadIdx.x;
  load_column_taps<Tiling>(s, block, tid, taps);
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
      if (upper_cell(s, r, c)) atomicAdd(group_gram + r * s.width + c, acc[i][j]);
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

#endif  // __CUDACC__ || __CUDACC_RTC__

// ---------------------------------------------------------------------------------------------
// FP64 tensor-core tiles (sm_80+): conv_gram_dmma_kernel, float64 Grams only.
//
// The block, its grid, split-K and gathered slabs are conv_gram_tile_kernel's (the same Tiling,
// 256 threads as a 16×16 block); only the product differs. Each chunk's slabs are held as A and B
// of G_tile += Aᵀ·B with A = R[chunk rows, tile_row's columns], B = R[chunk rows, tile_col's],
// and multiplied by mma.sync.aligned.m8n8k4.row.col.f64: an 8×8 += 8×4 · 4×8 product per warp
// and instruction. The 8 warps tile the 64×64 output as 2 (down) × 4 (across), each warp owning
// a 32×16 block = 4×2 mma tiles, 16 float64 accumulators per thread; a 16-row chunk is 4 k-steps
// of 8 mma each per warp.
//
// Fragments (PTX ISA, "Matrix Fragments for mma.m8n8k4 with .f64"): with g = lane >> 2 and
// t = lane & 3, a lane holds A_mma[g][t] (8×4, row), B_mma[t][g] (4×8, col) and C[g][2t], C[g][2t+1].
// Here A_mma[m][k] = R[k][m] (the slab read down a tile column), so both operands are
// "R[k-step row t][tile column g]": a slab stored column by column, k contiguous, serves both.
// Its column stride kChunk + 4 puts the warp's 32 reads (8 columns × 4 rows) on 32 distinct
// 8-byte words modulo 16 pairs of banks, two wavefronts, the least for 32 doubles; the loaders'
// writes (16 consecutive rows of 2 columns) land conflict-free the same way.
//
// The DmmaTiles functions are the whole index arithmetic (loads, fragments, output cells), for
// the device and for the CPU twin (csrc/cpu/conv_gram_dmma_twin.cpp) alike; only the m8n8k4
// product itself differs (DMMA on the GPU, an emulation of the PTX fragment layout on the CPU).
// ---------------------------------------------------------------------------------------------

template <typename Tiling_>
struct DmmaTiles {
  using Tiling = Tiling_;
  static constexpr int kTile = Tiling::kTile;
  static constexpr int kChunk = Tiling::kChunk;
  static constexpr int kThreads = Tiling::kThreads;
  static constexpr int kWarpSize = 32;
  static constexpr int kWarps = kThreads / kWarpSize;
  static constexpr int kWarpRows = 2;                   // warps down the tile
  static constexpr int kWarpCols = kWarps / kWarpRows;  // warps across it
  static constexpr int kWarpM = kTile / kWarpRows;      // tile rows per warp (32)
  static constexpr int kWarpN = kTile / kWarpCols;      // tile columns per warp (16)
  static constexpr int kMmaMN = 8;                      // m8n8k4
  static constexpr int kMmaK = 4;
  static constexpr int kFragsM = kWarpM / kMmaMN;  // mma tiles per warp, down (4)
  static constexpr int kFragsN = kWarpN / kMmaMN;  // and across (2)
  static constexpr int kSteps = kChunk / kMmaK;    // k-steps per chunk (4)
  static constexpr int kSlabStride = kChunk + 4;   // doubles between tile columns of a slab
  static constexpr int kSlabSize = kTile * kSlabStride;

  static_assert(kThreads % (kWarpSize * kWarpRows) == 0, "whole warps, kWarpRows of them down the tile");
  static_assert(kTile % (kWarpRows * kMmaMN) == 0 && kTile % (kWarpCols * kMmaMN) == 0,
                "every warp owns whole 8×8 mma tiles");
  static_assert(kChunk % kMmaK == 0, "whole k-steps per chunk");

  // The slab word of chunk row k (0 ≤ k < kChunk), tile column col (0 ≤ col < kTile).
  SAP_FAST_HD static constexpr int slab_index(int k, int col) { return col * kSlabStride + k; }

  // Thread tid's share of one chunk: rows [chunk, chunk + kChunk) of R (rows past row_end and
  // columns past d read as zero) converted to float64 into the slabs; col_slab is left alone on
  // the diagonal (its product reads row_slab twice). Neighbouring threads take neighbouring rows,
  // as conv_gram_tile_kernel's loaders do.
  template <typename scalar_t>
  SAP_FAST_HD static void gather_chunk(const scalar_t* x, const ConvGramShape& s, const ColumnTap* row_taps,
                                       const ColumnTap* col_taps, int64_t chunk, int64_t row_end, bool diagonal,
                                       int tid, double* row_slab, double* col_slab) {
    const int load_row = tid % kChunk;
    const int load_col = tid / kChunk;
    const RowOrigin origin = make_row_origin(s, chunk + load_row, row_end);
    SAP_FAST_UNROLL
    for (int l = 0; l < Tiling::kLoadsPerThread; ++l) {
      const int col = load_col + l * Tiling::kColsPerLoad;
      row_slab[slab_index(load_row, col)] = patch_value<scalar_t, double>(x, s, origin, row_taps[col]);
      if (!diagonal) col_slab[slab_index(load_row, col)] = patch_value<scalar_t, double>(x, s, origin, col_taps[col]);
    }
  }

  // The first tile row and column of warp `warp`'s 32×16 block.
  SAP_FAST_HD static constexpr int warp_row(int warp) { return warp / kWarpCols * kWarpM; }
  SAP_FAST_HD static constexpr int warp_col(int warp) { return warp % kWarpCols * kWarpN; }

  // Lane `lane`'s A and B fragments at k-step `step`: a[mi] = A_mma[g][t] of mma tile row mi,
  // b[nj] = B_mma[t][g] of mma tile column nj, both read as slab (chunk row 4·step + t, column).
  SAP_FAST_HD static void load_fragments(const double* left, const double* right, int warp, int lane, int step,
                                         double (&a)[kFragsM], double (&b)[kFragsN]) {
    const int k = step * kMmaK + (lane & 3);
    const int within = lane >> 2;
    SAP_FAST_UNROLL
    for (int mi = 0; mi < kFragsM; ++mi) a[mi] = left[slab_index(k, warp_row(warp) + mi * kMmaMN + within)];
    SAP_FAST_UNROLL
    for (int nj = 0; nj < kFragsN; ++nj) b[nj] = right[slab_index(k, warp_col(warp) + nj * kMmaMN + within)];
  }

  // The tile row and column of accumulator i (0, 1) of mma tile (mi, nj) in lane `lane`: C[g][2t + i].
  SAP_FAST_HD static constexpr int cell_row(int warp, int lane, int mi) {
    return warp_row(warp) + mi * kMmaMN + (lane >> 2);
  }
  SAP_FAST_HD static constexpr int cell_col(int warp, int lane, int nj, int i) {
    return warp_col(warp) + nj * kMmaMN + 2 * (lane & 3) + i;
  }
};

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)

// c += A_mma·B_mma for one 8×8 tile, the warp's 32 lanes together (each passes its fragments).
// Below sm_80 (a build whose PTX is compiled for an older GPU and run on a newer one) the same
// product from warp shuffles, in the same fragment layout: slower, never wrong.
__device__ inline void dmma_m8n8k4(double (&c)[2], double a, double b, int lane) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  (void)lane;
  asm("mma.sync.aligned.m8n8k4.row.col.f64.f64.f64.f64 {%0, %1}, {%2}, {%3}, {%0, %1};\n"
      : "+d"(c[0]), "+d"(c[1])
      : "d"(a), "d"(b));
#else
  const int col = 2 * (lane & 3);
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const double ak = __shfl_sync(0xffffffffu, a, (lane & ~3) | k);  // A_mma[g][k] is lane 4g + k's
    c[0] = fma(ak, __shfl_sync(0xffffffffu, b, 4 * col + k), c[0]);  // B_mma[k][n] is lane 4n + k's
    c[1] = fma(ak, __shfl_sync(0xffffffffu, b, 4 * (col + 1) + k), c[1]);
  }
#endif
}

// conv_gram_tile_kernel's contract (one upper tile, one group, one row range, added with
// atomicAdd into a zeroed float64 G; the mirror completes it) with the product on tensor cores.
template <typename scalar_t, typename Tiling>
__global__ void __launch_bounds__(Tiling::kThreads)
    conv_gram_dmma_kernel(const scalar_t* __restrict__ x, double* __restrict__ gram, ConvGramShape s,
                          int64_t rows_per_split) {
  using Tiles = DmmaTiles<Tiling>;
  const TileBlock block = tile_block(s, Tiling::kTile, rows_per_split, blockIdx.x, blockIdx.y, blockIdx.z);
  if (block.row_begin >= block.row_end) return;  // tile_grid_size's grid has no empty range

  __shared__ double row_slab[Tiles::kSlabSize];  // R[chunk rows, tile_row's columns], column by column
  __shared__ double col_slab[Tiles::kSlabSize];  // R[chunk rows, tile_col's columns]; unused on the diagonal
  __shared__ ColumnTap taps[2][Tiling::kTile];

  const int tid = threadIdx.y * Tiling::kThreadsPerDim + threadIdx.x;
  const int warp = tid / Tiles::kWarpSize;
  const int lane = tid % Tiles::kWarpSize;
  load_column_taps<Tiling>(s, block, tid, taps);
  __syncthreads();

  double acc[Tiles::kFragsM][Tiles::kFragsN][2] = {};
  const double* const right = block.diagonal ? row_slab : col_slab;

  for (int64_t chunk = block.row_begin; chunk < block.row_end; chunk += Tiling::kChunk) {
    Tiles::gather_chunk(x, s, taps[0], taps[1], chunk, block.row_end, block.diagonal, tid, row_slab, col_slab);
    __syncthreads();
#pragma unroll
    for (int step = 0; step < Tiles::kSteps; ++step) {
      double a[Tiles::kFragsM], b[Tiles::kFragsN];
      Tiles::load_fragments(row_slab, right, warp, lane, step, a, b);
#pragma unroll
      for (int mi = 0; mi < Tiles::kFragsM; ++mi) {
#pragma unroll
        for (int nj = 0; nj < Tiles::kFragsN; ++nj) dmma_m8n8k4(acc[mi][nj], a[mi], b[nj], lane);
      }
    }
    __syncthreads();  // the slabs are overwritten by the next chunk
  }

  double* group_gram = gram + block.group * s.width * s.width;
#pragma unroll
  for (int mi = 0; mi < Tiles::kFragsM; ++mi) {
    const int64_t r = block.tile_row * Tiling::kTile + Tiles::cell_row(warp, lane, mi);
#pragma unroll
    for (int nj = 0; nj < Tiles::kFragsN; ++nj) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int64_t c = block.tile_col * Tiling::kTile + Tiles::cell_col(warp, lane, nj, i);
        if (upper_cell(s, r, c)) atomicAdd(group_gram + r * s.width + c, acc[mi][nj][i]);
      }
    }
  }
}

#endif  // __CUDACC__ || __CUDACC_RTC__

// ---------------------------------------------------------------------------------------------
// The grid of the tile kernels, host side (no torch). The launch itself is planned in Python
// (sap_fast/backends/conv_launch.py: kernel, split-K ranges, mirror grid), and launched from that
// plan by csrc/cuda/conv_gram.cu or through NVRTC (sap_fast/backends/nvrtc.py). What is here is
// the kernels' indexing contract, shared by that launch op and the CPU twin: the grid that
// tile_block maps one-to-one onto (upper tile, group, row range) for a given rows_per_split, and
// whether a shape's grid fits CUDA's limits at all. Not for NVRTC (device code only).
// ---------------------------------------------------------------------------------------------
#ifndef __CUDACC_RTC__

// (upper tiles, groups, row ranges) for ranges of rows_per_split rows: blockIdx.x, .y, .z of
// tile_block. rows_per_split > 0.
template <typename Tiling>
inline void tile_grid_size(const ConvGramShape& s, int64_t rows_per_split, int64_t size[3]) {
  size[0] = upper_tile_count((s.width + Tiling::kTile - 1) / Tiling::kTile);
  size[1] = s.groups;
  size[2] = s.rows / rows_per_split + (s.rows % rows_per_split != 0);
}

// Whether the launch grid can hold this shape: groups on gridDim.y (≤ 65535), upper tiles on
// gridDim.x (< 2^31).
inline bool conv_gram_grid_fits(const ConvGramShape& s, int tile) {
  const int64_t tiles = (s.width + tile - 1) / tile;
  return s.groups <= 65535 && upper_tile_count(tiles) <= 2147483647LL;
}

#endif  // __CUDACC_RTC__

}  // namespace sap_fast::cuda
