// The op schemas of sap_fast (one place), and the Python module `sap_fast._C`.
//
// Ops are registered with the PyTorch dispatcher (TORCH_LIBRARY): `torch.ops.sap_fast.<op>` then
// picks the CPU kernel (csrc/cpu/) or the CUDA kernel (csrc/cuda/, built only when CUDA is) by the
// device of its tensors. The pybind11 module only answers what was built; no tensor crosses it.
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include <string>

TORCH_LIBRARY(sap_fast, m) {
  // Σ over every row of the conv's patch matrix R (implicit im2col, R never stored) of rᵀr, per
  // group: (groups, d, d) with d = (C/groups)·prod(kernel_size); column index c·prod(k) + offset,
  // the order of weight.view(out, -1). x is (N, C, *spatial) with 1 to 3 spatial dims, zero
  // padding of `padding[i]` on both sides of dim i. dtype: accumulation and output dtype
  // (float32 or float64).
  m.def("conv_gram(Tensor x, int[] kernel_size, int[] stride, int[] padding, int[] dilation, "
        "int groups, ScalarType dtype) -> Tensor");
  // The same Gram for stride-1 convs from shifted channel cross-correlations (exact).
  m.def("conv_gram_shift(Tensor x, int[] kernel_size, int[] padding, int[] dilation, int groups, "
        "ScalarType dtype) -> Tensor");
  // conv_gram's CUDA kernels launched from a launch plan (sap_fast/backends/conv_launch.py, whose
  // Python CUDA kernel of conv_gram calls this): writes G into gram, a contiguous (groups, d, d)
  // tensor of the accumulation dtype on x's device, on the current stream. x contiguous.
  // rows_per_split: rows per split-K range (a positive multiple of the 16-row chunk, at most 65535
  // ranges); dmma: the FP64 tensor-core tiles (float64 gram only) instead of the FMA tiles;
  // mirror_blocks/mirror_threads: the grid of the kernel that copies G's upper triangle down.
  // CUDA only (csrc/cuda/conv_gram.cu).
  m.def("conv_gram_launch(Tensor x, Tensor(a!) gram, int[] kernel_size, int[] stride, int[] padding, "
        "int[] dilation, int groups, int rows_per_split, bool dmma, int mirror_blocks, int mirror_threads) -> ()");
  // conv_gram with dtype float64 as the CUDA tensor-core tiles compute it with ranges of
  // rows_per_split rows (a launch plan's, sap_fast.backends.conv_launch.plan), emulated on the
  // CPU through the kernel's own index code (csrc/cpu/conv_gram_dmma_twin.cpp): the twin that
  // the tests hold to the oracle. Not a route of the statistics pass.
  m.def("conv_gram_dmma_twin(Tensor x, int[] kernel_size, int[] stride, int[] padding, int[] dilation, "
        "int groups, int rows_per_split) -> Tensor");
  // Symmetric eigendecomposition of a batch (B, n, n) of Grams (lower triangle read): ascending
  // eigenvalues (B, n) and orthonormal eigenvectors as columns (B, n, n), like torch.linalg.eigh.
  m.def("eigh(Tensor gram) -> (Tensor, Tensor)");
}

#ifndef SAP_FAST_WITH_CUDA
#define SAP_FAST_WITH_CUDA 0
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "sap_fast native kernels (ops live in torch.ops.sap_fast)";
  m.def("build_info", [] {
    pybind11::dict info;
    info["cuda"] = bool(SAP_FAST_WITH_CUDA);
#ifdef SAP_FAST_CUDA_ARCHS
    info["cuda_archs"] = std::string(SAP_FAST_CUDA_ARCHS);
#endif
#ifdef SAP_FAST_TORCH_VERSION
    info["torch"] = std::string(SAP_FAST_TORCH_VERSION);
#endif
    return info;
  });
}
