"""The backends: the Gram route, the native CPU and CUDA kernels, the shift form and the Triton
kernels (run by Triton's interpreter on a machine without a GPU)."""
