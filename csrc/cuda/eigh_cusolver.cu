// CUDA kernel of sap_fast::eigh (schema in csrc/sap_fast.cpp): symmetric eigendecomposition of a
// batch of Grams with cuSOLVER, returning what torch.linalg.eigh(gram) (UPLO="L") returns:
// ascending eigenvalues (B, n) and orthonormal eigenvectors as columns (B, n, n), so that
// V @ diag(e) @ V.mT reconstructs the symmetric matrix defined by gram's lower triangle.
//
// Strategy:
//   n ≤ 32   one cusolverDn{S,D}syevjBatched call over the whole batch (Jacobi, all matrices at
//            once; the batched Jacobi exists only up to 32);
//   n > 32   cusolverDn{S,D}syevd (divide and conquer) per matrix, matrices dealt round-robin
//            over up to kMaxLanes streams: syevd of one matrix is a chain of small, latency-bound
//            steps, so several matrices in flight keep the GPU busier than one after another.
//
// Layout (row-major torch vs column-major cuSOLVER). cuSOLVER reads element (i, j) of an n×n
// matrix at offset i + j·n. We hand it a copy of gram.mT, made contiguous: offset i + j·n of that
// copy holds gram[i, j], so cuSOLVER sees gram itself and CUBLAS_FILL_MODE_LOWER reads gram's
// lower triangle (i ≥ j), as torch.linalg.eigh does. (Handing it gram's own row-major buffer
// would show it gram.mT, whose lower triangle is gram's upper one.) cuSOLVER overwrites that
// copy with the eigenvectors as its columns: eigenvector k at offsets k·n … k·n + n-1, i.e. row k
// of the row-major buffer. So the buffer is Vᵀ row-major, and V = buffer.mT; we return it made
// contiguous (row-major), which is what a fake/meta kernel producing torch.empty would promise.
//
// Streams. Lane 0 is the caller's current stream; lanes 1.. are side streams owned here. Every
// tensor (inputs, outputs, workspaces) is allocated on the current stream; the side lanes wait
// for an event recorded there before starting, and the current stream waits for an event each
// side lane records after its last call. So the results are ready on the current stream when
// the op returns, and the caching allocator's later reuse of the workspaces (on the current
// stream, the one they were allocated on) is ordered after the side lanes' work: no
// recordStream needed.
//
// Errors. Every cuSOLVER status is checked; devInfo (one int per matrix) is copied to the host,
// which synchronises the current stream (torch.linalg.eigh does the same), and a matrix that did
// not converge is reported by index.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cusolverDn.h>

#include <array>
#include <climits>
#include <cstdint>
#include <memory>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

constexpr int kMaxLanes = 4;
constexpr int64_t kMaxBatchedJacobiSize = 32;  // syevjBatched's limit on n
constexpr int64_t kWorkspaceAlignment = 256;   // bytes; each lane's workspace slice starts aligned

const char* cusolver_status_name(cusolverStatus_t status) {
  switch (status) {
    case CUSOLVER_STATUS_SUCCESS: return "CUSOLVER_STATUS_SUCCESS";
    case CUSOLVER_STATUS_NOT_INITIALIZED: return "CUSOLVER_STATUS_NOT_INITIALIZED";
    case CUSOLVER_STATUS_ALLOC_FAILED: return "CUSOLVER_STATUS_ALLOC_FAILED";
    case CUSOLVER_STATUS_INVALID_VALUE: return "CUSOLVER_STATUS_INVALID_VALUE";
    case CUSOLVER_STATUS_ARCH_MISMATCH: return "CUSOLVER_STATUS_ARCH_MISMATCH";
    case CUSOLVER_STATUS_EXECUTION_FAILED: return "CUSOLVER_STATUS_EXECUTION_FAILED";
    case CUSOLVER_STATUS_INTERNAL_ERROR: return "CUSOLVER_STATUS_INTERNAL_ERROR";
    case CUSOLVER_STATUS_NOT_SUPPORTED: return "CUSOLVER_STATUS_NOT_SUPPORTED";
    default: return "unknown cusolverStatus_t";
  }
}

#define SAP_FAST_CUSOLVER_CHECK(EXPR)                                                                 \
  do {                                                                                                \
    const cusolverStatus_t sap_fast_status = (EXPR);                                                  \
    TORCH_CHECK(sap_fast_status == CUSOLVER_STATUS_SUCCESS, "sap_fast eigh: ", #EXPR, " failed: ",   \
                cusolver_status_name(sap_fast_status), " (", static_cast<int>(sap_fast_status), ")"); \
  } while (0)

// ---------------------------------------------------------------------------------------------
// cuSOLVER entry points by scalar type
// ---------------------------------------------------------------------------------------------

template <typename scalar_t>
struct Solver;

template <>
struct Solver<float> {
  static cusolverStatus_t syevd_buffer_size(cusolverDnHandle_t h, int n, const float* a, const float* w, int* lwork) {
    return cusolverDnSsyevd_bufferSize(h, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, n, a, n, w, lwork);
  }
  static cusolverStatus_t syevd(cusolverDnHandle_t h, int n, float* a, float* w, float* work, int lwork, int* info) {
    return cusolverDnSsyevd(h, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, n, a, n, w, work, lwork, info);
  }
  static cusolverStatus_t syevj_batched_buffer_size(cusolverDnHandle_t h, int n, const float* a, const float* w,
                                                    int* lwork, syevjInfo_t params, int batch) {
    return cusolverDnSsyevjBatched_bufferSize(h, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, n, a, n, w, lwork,
                                              params, batch);
  }
  static cusolverStatus_t syevj_batched(cusolverDnHandle_t h, int n, float* a, float* w, float* work, int lwork,
                                        int* info, syevjInfo_t params, int batch) {
    return cusolverDnSsyevjBatched(h, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, n, a, n, w, work, lwork, info,
                                   params, batch);
  }
};

template <>
struct Solver<double> {
  static cusolverStatus_t syevd_buffer_size(cusolverDnHandle_t h, int n, const double* a, const double* w, int* lwork) {
    return cusolverDnDsyevd_bufferSize(h, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, n, a, n, w, lwork);
  }
  static cusolverStatus_t syevd(cusolverDnHandle_t h, int n, double* a, double* w, double* work, int lwork, int* info) {
    return cusolverDnDsyevd(h, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, n, a, n, w, work, lwork, info);
  }
  static cusolverStatus_t syevj_batched_buffer_size(cusolverDnHandle_t h, int n, const double* a, const double* w,
                                                    int* lwork, syevjInfo_t params, int batch) {
    return cusolverDnDsyevjBatched_bufferSize(h, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, n, a, n, w, lwork,
                                              params, batch);
  }
  static cusolverStatus_t syevj_batched(cusolverDnHandle_t h, int n, double* a, double* w, double* work, int lwork,
                                        int* info, syevjInfo_t params, int batch) {
    return cusolverDnDsyevjBatched(h, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, n, a, n, w, work, lwork, info,
                                   params, batch);
  }
};

// ---------------------------------------------------------------------------------------------
// Per-device solver lanes, created lazily and kept for the life of the process (like torch's
// own handle pools: destroying them from static destructors can race the CUDA driver's exit).
// ---------------------------------------------------------------------------------------------

struct SolverLane {
  cusolverDnHandle_t handle = nullptr;
  cudaStream_t side_stream = nullptr;  // lanes ≥ 1 only; lane 0 runs on the caller's current stream
  cudaEvent_t done = nullptr;          // recorded on side_stream after the lane's last call
};

struct DeviceSolvers {
  // cuSOLVER handles are not safe for concurrent use, and the cached events are re-recorded on
  // every call: one host thread at a time enqueues work on a device's lanes.
  std::mutex mutex;
  std::array<SolverLane, kMaxLanes> lanes;
  cudaEvent_t inputs_ready = nullptr;  // recorded on the current stream; side lanes wait on it
};

DeviceSolvers& device_solvers(c10::DeviceIndex device) {
  static std::mutex registry_mutex;
  static std::vector<std::unique_ptr<DeviceSolvers>> registry;
  const std::lock_guard<std::mutex> lock(registry_mutex);
  if (registry.size() <= static_cast<size_t>(device)) registry.resize(device + 1);
  if (!registry[device]) registry[device] = std::make_unique<DeviceSolvers>();
  return *registry[device];  // unique_ptr: the address survives later resizes
}

// Makes lanes [0, count) usable on the current device. Called with the device's mutex held.
void ensure_lanes(DeviceSolvers& solvers, int count) {
  for (int i = 0; i < count; ++i) {
    SolverLane& lane = solvers.lanes[i];
    if (lane.handle == nullptr) SAP_FAST_CUSOLVER_CHECK(cusolverDnCreate(&lane.handle));
    if (i > 0 && lane.side_stream == nullptr) {
      // Non-blocking: no implicit sync with the legacy default stream, ordering is by events.
      C10_CUDA_CHECK(cudaStreamCreateWithFlags(&lane.side_stream, cudaStreamNonBlocking));
      SAP_FAST_CUSOLVER_CHECK(cusolverDnSetStream(lane.handle, lane.side_stream));
    }
    if (i > 0 && lane.done == nullptr) C10_CUDA_CHECK(cudaEventCreateWithFlags(&lane.done, cudaEventDisableTiming));
  }
  if (count > 1 && solvers.inputs_ready == nullptr) {
    C10_CUDA_CHECK(cudaEventCreateWithFlags(&solvers.inputs_ready, cudaEventDisableTiming));
  }
}

// Destroys a syevjInfo_t however the scope is left (a failed check throws).
struct SyevjParams {
  syevjInfo_t params = nullptr;
  SyevjParams() { SAP_FAST_CUSOLVER_CHECK(cusolverDnCreateSyevjInfo(&params)); }
  ~SyevjParams() {
    if (params != nullptr) cusolverDnDestroySyevjInfo(params);
  }
  SyevjParams(const SyevjParams&) = delete;
  SyevjParams& operator=(const SyevjParams&) = delete;
};

at::Tensor byte_workspace(int64_t bytes, const at::Tensor& like) {
  // From torch's caching allocator, on the current stream.
  return at::empty({bytes > 0 ? bytes : 1}, like.options().dtype(at::kByte));
}

// n ≤ 32: one batched Jacobi call over all matrices, on the current stream.
template <typename scalar_t>
void solve_batched_jacobi(DeviceSolvers& solvers, cudaStream_t stream, int n, int batch, scalar_t* matrices,
                          scalar_t* values, int* info, const at::Tensor& like) {
  ensure_lanes(solvers, 1);
  cusolverDnHandle_t handle = solvers.lanes[0].handle;
  SAP_FAST_CUSOLVER_CHECK(cusolverDnSetStream(handle, stream));
  SyevjParams params;
  // Defaults: tolerance = machine epsilon, 100 sweeps. Ascending order is the default too; set
  // it anyway, the output contract depends on it.
  SAP_FAST_CUSOLVER_CHECK(cusolverDnXsyevjSetSortEig(params.params, 1));
  int lwork = 0;
  SAP_FAST_CUSOLVER_CHECK(
      Solver<scalar_t>::syevj_batched_buffer_size(handle, n, matrices, values, &lwork, params.params, batch));
  at::Tensor workspace = byte_workspace(static_cast<int64_t>(lwork) * sizeof(scalar_t), like);
  SAP_FAST_CUSOLVER_CHECK(Solver<scalar_t>::syevj_batched(handle, n, matrices, values,
                                                          static_cast<scalar_t*>(workspace.mutable_data_ptr()), lwork,
                                                          info, params.params, batch));
}

// n > 32: syevd per matrix, matrix b on lane b mod lanes.
template <typename scalar_t>
void solve_divide_and_conquer(DeviceSolvers& solvers, cudaStream_t stream, int n, int64_t batch,
                              scalar_t* matrices, scalar_t* values, int* info, const at::Tensor& like) {
  const int lanes = static_cast<int>(batch < kMaxLanes ? batch : kMaxLanes);
  ensure_lanes(solvers, lanes);
  SAP_FAST_CUSOLVER_CHECK(cusolverDnSetStream(solvers.lanes[0].handle, stream));

  // The workspace size depends only on n and the dtype: one query, one slice per lane (matrices
  // on the same lane run one after another and can share it).
  int lwork = 0;
  SAP_FAST_CUSOLVER_CHECK(Solver<scalar_t>::syevd_buffer_size(solvers.lanes[0].handle, n, matrices, values, &lwork));
  int64_t slice_bytes = static_cast<int64_t>(lwork) * sizeof(scalar_t);
  slice_bytes = (slice_bytes + kWorkspaceAlignment - 1) / kWorkspaceAlignment * kWorkspaceAlignment;
  at::Tensor workspace = byte_workspace(slice_bytes * lanes, like);
  auto* workspace_base = static_cast<unsigned char*>(workspace.mutable_data_ptr());

  if (lanes > 1) {
    // Side lanes start once everything enqueued so far on the current stream (the copy of the
    // input, the output and workspace allocations) is done.
    C10_CUDA_CHECK(cudaEventRecord(solvers.inputs_ready, stream));
    for (int l = 1; l < lanes; ++l) {
      C10_CUDA_CHECK(cudaStreamWaitEvent(solvers.lanes[l].side_stream, solvers.inputs_ready, 0));
    }
  }
  const int64_t matrix_elems = static_cast<int64_t>(n) * n;
  for (int64_t b = 0; b < batch; ++b) {
    const int l = static_cast<int>(b % lanes);
    auto* lane_workspace = reinterpret_cast<scalar_t*>(workspace_base + l * slice_bytes);
    SAP_FAST_CUSOLVER_CHECK(Solver<scalar_t>::syevd(solvers.lanes[l].handle, n, matrices + b * matrix_elems,
                                                    values + b * n, lane_workspace, lwork, info + b));
  }
  for (int l = 1; l < lanes; ++l) {
    // The current stream joins every side lane before anything later runs on it.
    C10_CUDA_CHECK(cudaEventRecord(solvers.lanes[l].done, solvers.lanes[l].side_stream));
    C10_CUDA_CHECK(cudaStreamWaitEvent(stream, solvers.lanes[l].done, 0));
  }
}

// info[b] > 0: matrix b did not converge; < 0: cuSOLVER rejected an argument (a bug here).
void check_info(const at::Tensor& info) {
  const at::Tensor host = info.cpu();  // synchronises the current stream
  const int* values = host.const_data_ptr<int>();
  for (int64_t b = 0; b < host.numel(); ++b) {
    TORCH_CHECK(values[b] >= 0, "sap_fast eigh: cuSOLVER rejected argument ", -values[b],
                " (internal error, please report)");
    TORCH_CHECK(values[b] == 0, "sap_fast eigh did not converge for matrix ", b, " (cuSOLVER info ", values[b],
                "); check the Gram for NaN/Inf, or retry in float64");
  }
}

std::tuple<at::Tensor, at::Tensor> eigh_cuda(const at::Tensor& gram) {
  TORCH_CHECK(gram.is_cuda(), "eigh (CUDA): gram must be a CUDA tensor, got ", gram.device());
  TORCH_CHECK(gram.dim() == 2 || gram.dim() == 3, "eigh: gram must be (n, n) or (B, n, n), got shape ", gram.sizes());
  TORCH_CHECK(gram.size(-1) == gram.size(-2), "eigh: gram must be square, got shape ", gram.sizes());
  TORCH_CHECK(gram.scalar_type() == at::kFloat || gram.scalar_type() == at::kDouble,
              "eigh: gram must be float32 or float64, got ", gram.scalar_type(), "; cast it with gram.double()");
  const bool batched = gram.dim() == 3;
  const int64_t n = gram.size(-1);
  const int64_t batch = batched ? gram.size(0) : 1;
  TORCH_CHECK(n <= INT_MAX && batch <= INT_MAX, "eigh: n and B must fit in int32 for cuSOLVER, got shape ",
              gram.sizes());

  const c10::cuda::CUDAGuard device_guard(gram.device());
  // Column-major copy (see the header comment); cuSOLVER overwrites it with the eigenvectors.
  // clone, not contiguous(): that could hand back the caller's own storage (n ≤ 1, or a
  // column-major input), which cuSOLVER would then overwrite.
  at::Tensor work = gram.reshape({batch, n, n}).mT().clone(at::MemoryFormat::Contiguous);
  at::Tensor values = at::empty({batch, n}, gram.options());

  if (batch > 0 && n > 0) {
    at::Tensor info = at::zeros({batch}, gram.options().dtype(at::kInt));
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(gram.get_device()).stream();
    DeviceSolvers& solvers = device_solvers(gram.get_device());
    {
      const std::lock_guard<std::mutex> lock(solvers.mutex);
      const auto solve = [&](auto* matrices, auto* eigenvalues) {
        using scalar_t = std::remove_pointer_t<decltype(matrices)>;
        if (n <= kMaxBatchedJacobiSize) {
          solve_batched_jacobi<scalar_t>(solvers, stream, static_cast<int>(n), static_cast<int>(batch), matrices,
                                         eigenvalues, info.mutable_data_ptr<int>(), gram);
        } else {
          solve_divide_and_conquer<scalar_t>(solvers, stream, static_cast<int>(n), batch, matrices, eigenvalues,
                                             info.mutable_data_ptr<int>(), gram);
        }
      };
      if (gram.scalar_type() == at::kDouble) {
        solve(work.mutable_data_ptr<double>(), values.mutable_data_ptr<double>());
      } else {
        solve(work.mutable_data_ptr<float>(), values.mutable_data_ptr<float>());
      }
    }
    check_info(info);
  }

  // work holds Vᵀ row-major (eigenvector k in row k): V = work.mT, made row-major.
  at::Tensor vectors = work.mT().contiguous();
  if (!batched) {
    values = values.squeeze(0);
    vectors = vectors.squeeze(0);
  }
  return {values, vectors};
}

}  // namespace

TORCH_LIBRARY_IMPL(sap_fast, CUDA, m) { m.impl("eigh", &eigh_cuda); }
