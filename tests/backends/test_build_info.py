"""What the native build says it built (``build_info()``), and the CUDA side of CMakeLists.txt
that decides it, on a machine without a GPU.

* This CPU build reports no CUDA and no CUDA architecture.
* The architectures a CUDA build reports are derived by cmake/cuda_libraries.cmake from the
  flags nvcc is given: torch's CMake turns CMAKE_CUDA_ARCHITECTURES off and adds -gencode flags
  of its own, so the list setup.py asked for is no longer in that variable. Tested with
  ``cmake -P`` on the exact flags torch 2.11's CMake adds, and, when ``make check-cuda-build``
  has configured the real CUDA build here, on its cache and compile commands.
* A CUDA configure that finds no cuSOLVER stops with one line that names what is missing.
"""
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from sap_fast.backends import native as backend
from sap_fast.backends.info import backend_info
from support import REPO_ROOT

CMAKE = shutil.which("cmake")
MODULE = os.path.join(REPO_ROOT, "cmake", "cuda_libraries.cmake")
CHECK_BUILD = os.path.join(REPO_ROOT, "build", "cuda-build", "native")  # tools/check_cuda_build.sh


def test_build_reports_the_cuda_archs_it_built():
    module = backend.native()
    if module is None:
        if os.environ.get("SAP_FAST_REQUIRE_NATIVE") == "1":
            raise RuntimeError(backend_info()["native"]["reason"])
        pytest.skip("sap_fast._C is not built")
    info = module.build_info()
    if info["cuda"]:  # a GPU machine's build: the architectures nvcc built, never "OFF"
        assert re.fullmatch(r"(sm|compute)_\d+[af]?(,(sm|compute)_\d+[af]?)*", info["cuda_archs"]), info
    else:
        assert info["cuda_archs"] == ""
    assert backend_info()["native"]["cuda_archs"] == info["cuda_archs"]


def _cmake_eval(body: str, tmp_path) -> str:
    script = tmp_path / "eval.cmake"
    script.write_text(f'include("{MODULE}")\n{body}\n')
    run = subprocess.run([CMAKE, "-P", str(script)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return run.stderr.strip()  # message(NOTICE) goes to stderr


# torch 2.11's CMake: CMAKE_CUDA_FLAGS gets " -gencode arch=compute_XX,code=sm_XX" per
# architecture of TORCH_CUDA_ARCH_LIST, and code=compute_XX for +PTX; CUDA_ARCHITECTURES is OFF
TORCH_FLAGS = ("-DONNX_NAMESPACE=onnx_c2 -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 "
               "-gencode arch=compute_90,code=compute_90 -Xcudafe --diag_suppress=cc_clobber_ignored "
               "--expt-relaxed-constexpr --expt-extended-lambda")


@pytest.mark.skipif(CMAKE is None, reason="needs cmake")
@pytest.mark.parametrize("flags, target, expected", [
    (TORCH_FLAGS, "OFF", "sm_80;sm_90;compute_90"),
    (" -gencode arch=compute_90,code=sm_90", "OFF", "sm_90"),
    ("--generate-code=arch=compute_90a,code=[sm_90a,compute_90a]", "OFF", "sm_90a;compute_90a"),
    ("", "80-real;90", "sm_80;sm_90;compute_90"),  # a CPU torch leaves CMAKE_CUDA_ARCHITECTURES on
    ("", "90-virtual", "compute_90"),
    (" -gencode arch=compute_90,code=sm_90", "90-real", "sm_90"),  # both say the same: once
    ("-O3", "OFF", ""),
])
def test_built_archs_follow_the_flags_nvcc_gets(flags, target, expected, tmp_path):
    out = _cmake_eval(f'sap_fast_built_cuda_archs(archs "{flags}" "{target}")\nmessage(NOTICE "${{archs}}")',
                      tmp_path)
    assert out == expected


@pytest.mark.skipif(CMAKE is None, reason="needs cmake")
@pytest.mark.parametrize("archs, expected", [
    ("90-real", "9.0"),
    ("80-real;90", "8.0;9.0+PTX"),
    ("90a-real", "9.0a"),
    ("100-virtual", "10.0+PTX"),
])
def test_cmake_arch_spelling_handed_to_torch(archs, expected, tmp_path):
    out = _cmake_eval(f'sap_fast_torch_arch_list(names "{archs}")\nmessage(NOTICE "${{names}}")', tmp_path)
    assert out == expected


def test_setup_py_asks_cmake_and_torch_for_the_same_archs():
    """setup.py's configure command: CMake's spelling and TORCH_CUDA_ARCH_LIST (which torch's
    CMake reads) name the same architectures, and sap_fast_torch_arch_list maps one to the other."""
    spec = importlib.util.spec_from_file_location("sap_fast_setup", os.path.join(REPO_ROOT, "setup.py"))
    setup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup)  # its functions only: setup() runs under __main__
    args, env = setup.cmake_configure("/b", "/o", "/torch/share/cmake", True, "/cuda/bin/nvcc", ["8.0", "9.0+PTX"])
    assert "-DCMAKE_CUDA_ARCHITECTURES=80-real;90" in args
    assert "-DSAP_FAST_CUDA=ON" in args and "-DCMAKE_CUDA_COMPILER=/cuda/bin/nvcc" in args
    assert env == {"TORCH_CUDA_ARCH_LIST": "8.0;9.0+PTX"}
    args, env = setup.cmake_configure("/b", "/o", "/torch/share/cmake", False)
    assert "-DSAP_FAST_CUDA=OFF" in args and env == {}
    assert not any(a.startswith("-DCMAKE_CUDA") for a in args)


def _check_build_cache() -> str:
    """The CMake cache of tools/check_cuda_build.sh's configure, when it completed here."""
    try:
        cache = open(os.path.join(CHECK_BUILD, "CMakeCache.txt")).read()
    except OSError:
        return ""
    complete = os.path.exists(os.path.join(CHECK_BUILD, "compile_commands.json"))
    return cache if complete and re.search(r"^SAP_FAST_CUDA_ARCHS:INTERNAL=", cache, re.M) else ""


@pytest.mark.skipif(not _check_build_cache(), reason="make check-cuda-build has not configured the CUDA build here")
def test_check_cuda_build_configure_reports_what_nvcc_builds():
    """The real CUDA configure of tools/check_cuda_build.sh (torch 2.11.0+cu130's CMake): the
    architectures build_info() will report are the ones every .cu is compiled for, and the ones
    asked for (TORCH_CUDA_ARCH_LIST, default 9.0)."""
    cache = _check_build_cache()
    reported = re.search(r"^SAP_FAST_CUDA_ARCHS:INTERNAL=(.*)$", cache, re.M).group(1)
    asked = re.search(r"^CMAKE_CUDA_ARCHITECTURES:\w+=(.*)$", cache, re.M).group(1)
    want = set()
    for arch in asked.split(";"):
        number = arch.replace("-real", "")
        want.add(f"sm_{number}")
        if not arch.endswith("-real"):
            want.add(f"compute_{number}")
    assert set(reported.split(",")) == want
    commands = [e["command"] for e in json.load(open(os.path.join(CHECK_BUILD, "compile_commands.json")))
                if e["file"].endswith(".cu")]
    assert commands
    for command in commands:
        assert f'-DSAP_FAST_CUDA_ARCHS=\\"{reported}\\"' in command
        flagged = {c for code in re.findall(r"(?<![\w-])code=(\[[^\]]*\]|[^ \"]+)", command) for c in code.strip("[]").split(",")}
        assert flagged == want


NVCC = shutil.which("nvcc")


@pytest.mark.slow
@pytest.mark.skipif(CMAKE is None or NVCC is None or shutil.which("ninja") is None, reason="needs cmake, ninja and nvcc")
def test_cuda_configure_without_cusolver_stops_with_one_line(tmp_path):
    """SAP_FAST_CUDA=ON where neither the toolkit nor the wheels beside torch have cuSOLVER (this
    machine's nvcc-only toolkit and its CPU torch): the configure stops with one line naming it."""
    import pybind11
    import torch
    if os.path.isdir(os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "nvidia")):
        pytest.skip("nvidia wheels beside this torch may hold cuSOLVER")
    run = subprocess.run([CMAKE, "-S", REPO_ROOT, "-B", str(tmp_path / "b"), "-G", "Ninja", "-DSAP_FAST_CUDA=ON",
                          f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
                          f"-Dpybind11_DIR={pybind11.get_cmake_dir()}", f"-DPython_EXECUTABLE={sys.executable}",
                          f"-DCMAKE_CUDA_COMPILER={NVCC}", "-DCMAKE_CUDA_ARCHITECTURES=90-real",
                          f"-DSAP_FAST_OUTPUT_DIR={tmp_path / 'o'}"],
                         capture_output=True, text=True, timeout=300)
    if "cusolverDn.h" not in run.stdout + run.stderr and run.returncode == 0:
        pytest.skip("this toolkit has cuSOLVER")
    assert run.returncode != 0
    lines = [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("sap_fast: SAP_FAST_CUDA=ON needs")]
    assert len(lines) == 1, run.stderr
    assert "cusolverDn.h" in lines[0] and "libcusolver" in lines[0] and "libnvrtc" in lines[0]
