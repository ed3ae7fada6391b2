"""What the SAP core runs on: the choice of kernel for each stage, and the call.

The core calls one function per stage, which chooses the implementation and runs it:
:func:`layer_gram` (accumulate), :func:`eigh` (spectrum), :func:`cholesky_ex` (solve) and
:func:`projected_update` (project). Each stage is a priority list of implementations, each with
its reasons for not serving a call (:mod:`.dispatch`); :func:`sap_fast.backend_info` and
``sap-fast info`` print each stage's choice and every skipped implementation's reasons from the
same choosers.

- :mod:`.gram`: the gram stage (the C++ shift-correlation and implicit-im2col kernels on the
  CPU; the CUDA and Triton implicit-im2col kernels and the torch shift form on a GPU; streamed
  rows otherwise);
- :mod:`.linalg`: the eigh and cholesky stages; :mod:`.update`: the update stage;
- :mod:`.dispatch`: implementations, stages, the chooser and the Triton compile fallback;
- :mod:`.geometry`: the conv Gram geometry record every Gram kernel takes, and its one check;
- :mod:`.native`: the optional extension ``sap_fast._C`` (``csrc/``), :mod:`._ops` its op shapes;
- :mod:`.triton`: the Triton Gram and update kernels, each beside its torch twin;
- :mod:`.nvrtc`: the CUDA Gram kernel of ``csrc/cuda/`` compiled at run time by NVRTC through
  cupy (GPU machines with torch from a wheel and no CUDA toolkit); :mod:`.batched_linalg`:
  batched cuSOLVER (syevjBatched, potrfBatched) through cupy, selected by switches;
  :mod:`.cupy_runtime`: loading cupy and handing it torch's streams;
- :mod:`.shift`: the shift-correlation Gram in torch weight-gradient convs;
- :mod:`.precision`: the tf32/bf16 input rounding every path shares;
- :mod:`.switches`: the environment switches, read in one place;
- :mod:`.info`: :func:`backend_info`, what was built and what each stage chooses.

Every stage ends in a plain-torch implementation, which serves when no other can; nothing here
imports the core, and nothing here knows ``torch.nn`` layers: kernels take tensors and geometry.
"""
from .gram import gram as layer_gram
from .linalg import cholesky_ex, eigh
from .update import projected_update

__all__ = ["layer_gram", "eigh", "cholesky_ex", "projected_update"]
