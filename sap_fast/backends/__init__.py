"""What the SAP core runs on: the choice of kernel for each stage, and the call.

- :mod:`.gram`: the accumulate stage's dispatch (C++ shift-correlation on the CPU, the CUDA and
  Triton implicit-im2col kernels and the torch shift form on a GPU), and its pure routing rule;
- :mod:`.native`: the optional extension ``sap_fast._C`` (``csrc/``), :mod:`.ops` its op shapes;
- :mod:`.triton`: the Triton Gram and update kernels, each beside its torch twin;
- :mod:`.nvrtc`: the CUDA Gram kernel of ``csrc/cuda/`` compiled at run time by NVRTC through
  cupy (GPU machines with torch from a wheel and no CUDA toolkit); :mod:`.batched_linalg`:
  batched cuSOLVER (syevjBatched, potrfBatched) through cupy, opt-in; :mod:`.cupy_runtime`:
  loading cupy and handing it torch's streams;
- :mod:`.shift`: the shift-correlation Gram in torch weight-gradient convs;
- :mod:`.precision`: the tf32/bf16 input rounding every path shares;
- :mod:`.info`: :func:`backend_info`, what was built and what each stage will use.

Everything here falls back to plain torch when its backend is missing; nothing here imports
the core.
"""
