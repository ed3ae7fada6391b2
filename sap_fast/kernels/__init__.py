"""Triton kernels of sap_fast (GPU fast paths; on CPU they run only under ``TRITON_INTERPRET=1``).

Each kernel module also holds a plain-torch twin (``*_reference``) with identical semantics: the
oracle for its tests and the fallback where Triton cannot run. Importing this package imports no
kernel module, so ``sap_fast`` never needs Triton.
"""
