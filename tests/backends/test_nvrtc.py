"""The cupy backend: the CUDA conv Gram kernel through NVRTC (sap_fast/backends/nvrtc.py) and the
batched cuSOLVER calls (sap_fast/backends/batched_linalg.py).

Without a GPU (this machine, CI):
- the routing decision with the cupy route, and the switches;
- where the kernel sources are found (an installed wheel's package data, a checkout), and that a
  built wheel ships them;
- the instantiations, and the Python copy of the source's struct (the launch plan both routes
  take is tests/backends/test_conv_launch.py's);
- the NVRTC compile of the real sources for sm_80 and sm_90 (skipped, saying why, only where
  cupy or its NVRTC does not load);
- the checks and one-line messages against the CMake-built op's (its CPU kernel shares them);
- the launch path end to end, from the launch plan, against stand-in kernels that do what the
  .cuh kernels do, read their arguments as the GPU would (the packed struct by its C layout), and
  check the grid;
- the batched cuSOLVER argument handling (layouts, triangles, workspace, pointer array, info)
  against a stand-in binding that does what cuSOLVER documents, on host memory.

On a GPU with cupy (skipped otherwise, saying why): the NVRTC kernel against the CMake-built one
(bitwise in float64 where the launch has one row range per tile) and against the portable path
to 1e-12 on the conv zoo; the stream it runs on; syevjBatched / potrfBatched against torch.
Timings are benchmarks/gpu_cupy.py's.
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import itertools
import math
import os
import re
import subprocess
import sys
import zipfile

import numpy
import pytest
import torch
import torch.nn.functional as F

import sap_fast
from sap_fast.backends import batched_linalg, conv_launch, cupy_runtime, linalg, nvrtc
from sap_fast.backends import gram as gram_backend
from sap_fast.backends.gram import route as gram_route
from support import CONV_CASES, conv_case, rel_err, unfold_gram

from .gram_support import force_gram, rows_only

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CUH = os.path.join(ROOT, "csrc", "cuda", "conv_gram_kernels.cuh")
F64, F32 = torch.float64, torch.float32


def _nvrtc_skip_reason():
    try:
        from cupy_backends.cuda.libs import nvrtc as lib
        lib.getVersion()
    except Exception as err:
        return (f"cupy's NVRTC does not load ({cupy_runtime.typed_first_line(err)}): pip install cupy-cuda13x "
                "nvidia-cuda-nvrtc (make check-cuda compiles the sources through NVRTC anyway)")
    return None


_NVRTC_SKIP = _nvrtc_skip_reason()
requires_nvrtc = pytest.mark.skipif(_NVRTC_SKIP is not None, reason=_NVRTC_SKIP or "")


def _gpu_skip_reason():
    if not torch.cuda.is_available():
        return "no CUDA device: the cupy kernels run on the GPU machine"
    cp, why = nvrtc.load()
    return None if cp is not None else f"the NVRTC kernel cannot run here: {why}"


_GPU_SKIP = _gpu_skip_reason()
requires_cupy_gpu = pytest.mark.skipif(_GPU_SKIP is not None, reason=_GPU_SKIP or "")


# ---------------------------------------------------------------------------------------------
# routing
# ---------------------------------------------------------------------------------------------

def route(device="cuda", dtype=F64, precision="fp32", conv=True, **kw):
    base = dict(stride_one_spatial=True, native_cpu=True, native_cuda=False, cupy_ok=True,
                triton_ok=True, choice="auto")
    base.update(kw)
    return gram_route(device, dtype, precision, conv=conv, **base)


@pytest.mark.parametrize("dtype", [F64, F32])
def test_convs_on_a_gpu_take_the_cmake_kernel_then_the_nvrtc_one_then_triton(dtype):
    assert route(dtype=dtype, native_cuda=True) == "cuda"      # the CMake build wins where built
    assert route(dtype=dtype) == "cupy"                        # torch from a wheel + cupy
    assert route(dtype=dtype, cupy_ok=False) == "triton"
    assert route(dtype=dtype, cupy_ok=False, triton_ok=False) is None
    assert route(dtype=dtype, stride_one_spatial=False) == "cupy"  # every conv geometry


def test_the_cupy_choice_and_its_fallbacks():
    assert route(choice="cupy", native_cuda=True) == "cupy"        # SAP_FAST_GRAM_KERNEL=cupy
    assert route(choice="cupy", native_cuda=True, cupy_ok=False) == "cuda"  # what auto picks
    assert route(choice="cupy", cupy_ok=False) == "triton"
    assert route(choice="cupy", cupy_ok=False, triton_ok=False) is None
    assert route(choice="cuda") == "cupy"                          # the same kernel, NVRTC-built
    assert route(choice="triton") == "triton"
    assert route(choice="triton", triton_ok=False) is None         # rows, not cupy
    assert route(choice="shift", shift_pays=True) == "torch-shift"
    assert route(choice="shift", shift_pays=False) == "cupy"


def test_the_nvrtc_kernel_never_serves_linear_layers_tensor_cores_or_other_devices():
    for choice in ("auto", "cupy"):
        assert route(conv=False, choice=choice) is None                 # cuBLAS on the rows
        assert route(dtype=F32, precision="tf32", choice=choice) == "triton"
        assert route(dtype=F64, precision="bf16", choice=choice) is None
        assert route("cpu", choice=choice) == "shift"
        assert route("cpu", native_cpu=False, choice=choice) is None
        assert route("mps", choice=choice) is None


def test_without_cupy_every_route_is_what_it_was():
    """cupy_ok=False (its default) leaves the table of the CMake/Triton routes unchanged."""
    old = dict(stride_one_spatial=True, native_cpu=True, triton_ok=True)
    for native_cuda, triton_ok, choice, conv, precision in itertools.product(
            [True, False], [True, False], ["auto", "cuda", "triton", "shift"], [True, False],
            ["fp32", "tf32"]):
        kw = dict(old, native_cuda=native_cuda, triton_ok=triton_ok, choice=choice)
        assert gram_route("cuda", F32, precision, conv=conv, **kw) != "cupy"


def test_the_kernel_choice_accepts_cupy(monkeypatch):
    monkeypatch.setenv("SAP_FAST_GRAM_KERNEL", "CuPy")
    assert gram_backend.kernel_choice() == "cupy"
    monkeypatch.setenv("SAP_FAST_GRAM_KERNEL", "nvrtc")
    with pytest.raises(ValueError, match=r"SAP_FAST_GRAM_KERNEL='nvrtc': use one of .*'cupy'"):
        gram_backend.kernel_choice()


def test_forced_portable_turns_cupy_off(monkeypatch):
    monkeypatch.setenv("SAP_FAST_BACKEND", "portable")
    assert nvrtc.load() == (None, "SAP_FAST_BACKEND=portable")
    assert batched_linalg.load() == (None, "SAP_FAST_BACKEND=portable")
    info = sap_fast.backend_info()
    assert not info["cupy"]["gram"]["used"] and not info["cupy"]["eigh"]["used"]
    assert all(v.startswith("portable") for s in info["stages"].values() for v in s.values())


def test_backend_info_says_whether_cupy_runs_why_not_and_for_which_stage(monkeypatch):
    info = sap_fast.backend_info()["cupy"]
    assert set(info) == {"gram", "cusolver", "eigh", "cholesky"}
    assert (info["gram"]["stage"], info["eigh"]["stage"], info["cholesky"]["stage"]) == \
        ("accumulate", "spectrum", "solve")
    if not info["gram"]["loaded"]:
        assert info["gram"]["reason"] and info["gram"]["uses"].startswith("not used: ")
        assert re.search(r"cupy is not installed|cannot load NVRTC|sees no GPU|kernel source",
                         info["gram"]["reason"])
    # the batched calls are opt-in: off by default whatever is installed
    assert info["eigh"]["choice"] == "auto" and not info["eigh"]["used"]
    assert info["cholesky"]["choice"] == "auto" and not info["cholesky"]["used"]
    # as on a GPU machine with cupy and no CMake-built CUDA kernel
    monkeypatch.setattr(nvrtc, "load", lambda: (object(), None))
    monkeypatch.setattr(batched_linalg, "load", lambda: (object(), None))
    monkeypatch.setenv("SAP_FAST_BATCHED_EIGH", "cupy")
    info = sap_fast.backend_info()
    assert info["cupy"]["gram"]["used"] == (not info["native"].get("cuda", False))
    assert info["cupy"]["eigh"]["used"] and info["cupy"]["eigh"]["uses"].startswith("spectrum: ")
    assert not info["cupy"]["cholesky"]["used"]
    assert info["stages"]["spectrum"]["cuda"].startswith("cupy: cuSOLVER syevjBatched")
    if not info["native"].get("cuda", False):
        assert info["stages"]["accumulate"]["cuda"].startswith("cupy: implicit-im2col")


# ---------------------------------------------------------------------------------------------
# the sources: lookup, package data, instantiations, the Python copy of the source's struct
# ---------------------------------------------------------------------------------------------

def test_sources_are_found_in_the_installed_package_first_then_in_the_checkout(tmp_path):
    package, checkout = tmp_path / "site" / "csrc" / "cuda", tmp_path / "repo" / "csrc" / "cuda"
    checkout.mkdir(parents=True)
    (checkout / "conv_gram_kernels.cuh").write_text("// checkout")
    dirs = [str(package), str(checkout)]
    assert nvrtc.source_path("conv_gram_kernels.cuh", dirs) == str(checkout / "conv_gram_kernels.cuh")
    package.mkdir(parents=True)
    (package / "conv_gram_kernels.cuh").write_text("// package data")
    assert nvrtc.read_source("conv_gram_kernels.cuh", dirs) == "// package data"
    with pytest.raises(FileNotFoundError, match=r"^the CUDA kernel source missing\.cuh is in none of") as err:
        nvrtc.source_path("missing.cuh", dirs)
    assert "\n" not in str(err.value)


def test_the_default_lookup_is_the_package_then_this_checkout():
    package, checkout = nvrtc.source_dirs()
    assert package == os.path.join(os.path.dirname(nvrtc.__file__), "csrc", "cuda")
    assert os.path.samefile(checkout, os.path.join(ROOT, "csrc", "cuda"))
    for name in nvrtc.KERNEL_SOURCES:  # this checkout: found (in the package data or csrc/)
        assert os.path.isfile(nvrtc.source_path(name))


@pytest.mark.slow
def test_a_built_wheel_ships_the_sources_and_finds_them_installed(tmp_path):
    """setup.py's build_py copies csrc/cuda/*.cuh into the wheel; imported from the unpacked
    wheel (no checkout around it), the backend finds them there. Built from a copy of the tree
    (no build files land in the checkout), without the native build."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md", "CMakeLists.txt"):
        if os.path.exists(os.path.join(ROOT, name)):
            (src / name).write_bytes(open(os.path.join(ROOT, name), "rb").read())
    ignore = __import__("shutil").ignore_patterns("__pycache__", "*.so", "csrc")  # no stale copy
    __import__("shutil").copytree(os.path.join(ROOT, "sap_fast"), src / "sap_fast", ignore=ignore)
    __import__("shutil").copytree(os.path.join(ROOT, "csrc"), src / "csrc")
    env = dict(os.environ, SAP_FAST_NATIVE="0", PIP_NO_INPUT="1")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("sap_fast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for name in nvrtc.KERNEL_SOURCES:
        assert f"sap_fast/backends/csrc/cuda/{name}" in names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("from sap_fast.backends import nvrtc; "
            "print(nvrtc.source_path('conv_gram_kernels.cuh'))")
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                           env=dict(os.environ, PYTHONPATH=str(site))).stdout.strip()
    assert found == str(site / "sap_fast" / "backends" / "csrc" / "cuda" / "conv_gram_kernels.cuh")
    with open(found) as copy, open(CUH) as original:
        assert copy.read() == original.read()


def test_the_instantiations_are_the_bindings_four_pairs_two_tensor_core_tiles_and_two_mirrors():
    names = nvrtc.KERNEL_SOURCES["conv_gram_kernels.cuh"]
    ns = "sap_fast::cuda::"
    assert names == (
        f"{ns}conv_gram_tile_kernel<float, float, {ns}DefaultGramTiling>",
        f"{ns}conv_gram_tile_kernel<float, double, {ns}DefaultGramTiling>",
        f"{ns}conv_gram_tile_kernel<double, float, {ns}DefaultGramTiling>",
        f"{ns}conv_gram_tile_kernel<double, double, {ns}DefaultGramTiling>",
        f"{ns}conv_gram_dmma_kernel<float, {ns}DefaultGramTiling>",
        f"{ns}conv_gram_dmma_kernel<double, {ns}DefaultGramTiling>",
        f"{ns}mirror_upper_to_lower_kernel<float>",
        f"{ns}mirror_upper_to_lower_kernel<double>")
    # every pair csrc/cuda/conv_gram.cu launches, and nothing else
    binding = open(os.path.join(ROOT, "csrc", "cuda", "conv_gram.cu")).read()
    pairs = set(re.findall(r"launch_tiles<(float|double), (float|double)>\(", binding))
    ctype = {"float": F32, "double": F64}
    assert {nvrtc.tile_kernel_name(ctype[a], ctype[b]) for a, b in pairs} == set(names[:4])
    # the tensor-core tiles for each input of a float64 Gram, launched from the same function
    assert {nvrtc.dmma_kernel_name(ctype[a]) for a, b in pairs if b == "double"} == set(names[4:6])
    assert "conv_gram_dmma_kernel<scalar_t, Tiling><<<" in binding


def test_the_plans_kernel_names_the_instantiation(monkeypatch):
    """Which kernel NVRTC launches is the launch plan's choice (tests/backends/test_conv_launch.py
    holds the choice itself: float64 from sm_80 on, SAP_FAST_GRAM_DMMA)."""
    monkeypatch.delenv("SAP_FAST_GRAM_DMMA", raising=False)
    shape = nvrtc.conv_gram_shape(torch.empty(2, 5, 6, 6), [3, 3], [1, 1], [1, 1], [1, 1], 1, F64)
    for major, acc, x_dtype, expected in [
            (9, F64, F32, nvrtc.dmma_kernel_name(F32)), (8, F64, F64, nvrtc.dmma_kernel_name(F64)),
            (7, F64, F32, nvrtc.tile_kernel_name(F32, F64)), (9, F32, F64, nvrtc.tile_kernel_name(F64, F32))]:
        assert nvrtc.kernel_name(conv_launch.plan(shape, 132, major, acc), x_dtype) == expected
    monkeypatch.setenv("SAP_FAST_GRAM_DMMA", "0")
    assert nvrtc.kernel_name(conv_launch.plan(shape, 132, 9, F64), F32) == nvrtc.tile_kernel_name(F32, F64)


def test_the_python_copies_of_the_struct_and_tiling_match_the_source():
    source = open(CUH).read()
    assert nvrtc.struct_fields_in(source) == list(nvrtc.SHAPE_FIELDS)
    assert nvrtc.SHAPE_DTYPE.itemsize == 8 * sum(n for _, n in nvrtc.SHAPE_FIELDS) == 208
    assert nvrtc.default_tiling_in(source) == (conv_launch.TILE, conv_launch.CHUNK, conv_launch.THREADS_PER_DIM)
    with pytest.raises(ValueError, match="unexpected member"):
        nvrtc.struct_fields_in("struct ConvGramShape {\n  int32_t batch;\n};")


def test_the_shape_packs_in_the_structs_order():
    shape = nvrtc.conv_gram_shape(torch.empty(3, 6, 11), [3], [2], [1], [2], 3, F32)
    values = numpy.frombuffer(shape.pack().tobytes(), dtype="<i8").tolist()
    assert values == [3, 6, 3, 2, 1, 1, 11, 1, 1, 5, 1, 1, 3, 1, 1, 2, 0, 0, 1, 1, 1, 2, 3, 6, 5, 15]


# ---------------------------------------------------------------------------------------------
# NVRTC on the real sources (no GPU needed)
# ---------------------------------------------------------------------------------------------

@requires_nvrtc
@pytest.mark.slow  # NVRTC compiles the kernels: a second each
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_nvrtc_compiles_every_kernel_source_with_its_instantiations(arch):
    for name, expressions in nvrtc.KERNEL_SOURCES.items():
        lowered = nvrtc.compile_source(name, arch, [nvrtc.CHECKOUT_SOURCE_DIR])
        assert set(lowered) == set(expressions)
        assert len(set(lowered.values())) == len(expressions)  # eight distinct kernels
        for expression, mangled in lowered.items():
            assert ("conv_gram_tile_kernel" in mangled) == ("conv_gram_tile_kernel" in expression)


@requires_nvrtc
def test_an_nvrtc_error_carries_the_log(tmp_path):
    (tmp_path / "conv_gram_kernels.cuh").write_text(open(CUH).read().replace("acc[i][j] +=", "acc[i][j] +=="))
    with pytest.raises(nvrtc.CompileError, match=r"conv_gram_kernels\.cuh \(sm_80\).*\n.*error"):
        nvrtc.compile_source("conv_gram_kernels.cuh", "80", [str(tmp_path)])


@requires_nvrtc
@pytest.mark.slow  # a fresh process that compiles the kernels
def test_the_compile_check_prints_one_line_per_file_and_architecture():
    """The script ``make check-cuda`` runs (there for sm_80 and sm_90; here one architecture, in
    another spelling: the compiles themselves are the test above)."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "check_nvrtc.py"), "9.0"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert [line.split()[:4] for line in lines] == [["OK", "csrc/cuda/conv_gram_kernels.cuh", "nvrtc", "sm_90"]]


def test_gpu_arch_spellings():
    assert {nvrtc.gpu_arch(a) for a in ("sm_90", "90", "9.0", "compute_90")} == {"sm_90"}
    with pytest.raises(ValueError, match="GPU architecture 'hopper'"):
        nvrtc.gpu_arch("hopper")


# ---------------------------------------------------------------------------------------------
# the checks: the CMake-built op's, message for message
# ---------------------------------------------------------------------------------------------

BAD_CALLS = {  # name: (x shape, x dtype, kernel, stride, padding, dilation, groups, out dtype)
    "six-dims": ((2, 3, 8, 8, 2, 2), F32, [3], [1], [1], [1], 1, F64),
    "two-dims": ((2, 3), F32, [3], [1], [1], [1], 1, F64),
    "half-input": ((2, 3, 8, 8), torch.float16, [3, 3], [1, 1], [1, 1], [1, 1], 1, F64),
    "int-output": ((2, 3, 8, 8), F32, [3, 3], [1, 1], [1, 1], [1, 1], 1, torch.int32),
    "bf16-output": ((2, 3, 8, 8), F32, [3, 3], [1, 1], [1, 1], [1, 1], 1, torch.bfloat16),
    "short-kernel": ((2, 3, 8), F32, [3, 3], [1, 1], [1, 1], [1, 1], 1, F64),
    "groups-not-dividing": ((2, 3, 8, 8), F32, [3, 3], [1, 1], [1, 1], [1, 1], 2, F64),
    "zero-groups": ((2, 4, 8, 8), F32, [3, 3], [1, 1], [1, 1], [1, 1], 0, F64),
    "zero-kernel": ((2, 3, 8, 8), F32, [3, 0], [1, 1], [1, 1], [1, 1], 1, F32),
    "negative-padding": ((2, 3, 8), F64, [3], [1], [-1], [1], 1, F32),
    "no-output": ((2, 3, 2, 2), F32, [3, 3], [1, 1], [0, 0], [1, 1], 1, F64),
    "dilated-no-output": ((1, 2, 5, 9, 9), F32, [3, 1, 1], [1, 1, 1], [0, 0, 0], [3, 1, 1], 1, F64),
}


def _native_cpu_op():
    from sap_fast.backends.native import native
    return native() is not None and torch._C._dispatch_has_kernel_for_dispatch_key("sap_fast::conv_gram", "CPU")


@pytest.mark.parametrize("name", sorted(BAD_CALLS))
def test_the_checks_and_messages_are_the_cmake_built_ops(name):
    shape, x_dtype, k, s, p, d, groups, dtype = BAD_CALLS[name]
    x = torch.zeros(shape, dtype=x_dtype)
    with pytest.raises(RuntimeError) as ours:
        nvrtc.conv_gram_shape(x, k, s, p, d, groups, dtype)
    message = str(ours.value)
    assert message.startswith("conv_gram: ") and "\n" not in message
    if not _native_cpu_op():
        pytest.skip("sap_fast._C (CPU) is not built: the messages are compared with its conv_gram")
    with pytest.raises(RuntimeError) as theirs:
        torch.ops.sap_fast.conv_gram(x, k, s, p, d, groups, dtype)
    assert message == str(theirs.value).splitlines()[0].replace("sap_fast.conv_gram: ", "conv_gram: ")


def test_the_cuda_ops_own_limits():
    x = torch.empty(1, 70000, 1)
    with pytest.raises(RuntimeError, match=r"^conv_gram: at most 65535 groups are supported on CUDA, got 70000$"):
        nvrtc.conv_gram_shape(x, [1], [1], [0], [1], 70000, F64)
    with pytest.raises(RuntimeError, match=r"^conv_gram: kernel_size/stride/padding/dilation out of range: "
                                           r"\[1\], \[1073741825\], \[0\], \[1\]$"):
        nvrtc.conv_gram_shape(torch.empty(1, 1, 4), [1], [2 ** 30 + 1], [0], [1], 1, F64)
    with pytest.raises(RuntimeError, match=r"^conv_gram: Gram width d = 4194304 is too large"):
        nvrtc.conv_gram_shape(torch.empty(1, 4096, 32, 32), [32, 32], [1, 1], [0, 0], [1, 1], 1, F64)


def test_geometry_arguments_must_be_lists_of_ints():
    x = torch.empty(1, 2, 5)
    with pytest.raises(RuntimeError, match=r"^conv_gram: kernel_size must be a list of ints \(one per spatial "
                                           r"dim of x\), got 3$"):
        nvrtc.conv_gram_shape(x, 3, [1], [0], [1], 1, F64)
    with pytest.raises(RuntimeError, match=r"^conv_gram: dilation must be a list of ints"):
        nvrtc.conv_gram_shape(x, [3], [1], [0], [1.0], 1, F64)
    assert nvrtc.conv_gram_shape(x, torch.Size([3]), (1,), [0], [1], 1, F64).width == 6


def test_conv_gram_wants_a_cuda_tensor():
    with pytest.raises(RuntimeError, match=r"^conv_gram \(CUDA\): x must be a CUDA tensor, got cpu$"):
        nvrtc.conv_gram(torch.randn(2, 3, 8, 8), [3, 3], [1, 1], [1, 1], [1, 1], 1, F64)
    with pytest.raises(TypeError, match="x must be a tensor, got list"):
        nvrtc.conv_gram([1.0], [3], [1], [1], [1], 1, F64)


# ---------------------------------------------------------------------------------------------
# the launch path, against stand-ins for cupy and the two kernels
# ---------------------------------------------------------------------------------------------

class StandIns:
    """cupy (``from_dlpack``) and a RawModule whose two kernels do on the CPU what the .cuh
    kernels do on the GPU, block by block, reading the launch as the GPU would: the shape from
    the packed bytes in the C struct's field order (parsed from the source, not the Python
    copy), the template arguments from the kernel name."""

    C_FIELDS = nvrtc.struct_fields_in(open(CUH).read())

    def __init__(self):
        self.launches = []

    def from_dlpack(self, tensor):
        return tensor

    def get_function(self, name):
        kind, types = re.fullmatch(r"sap_fast::cuda::(\w+)<(.*)>", name).groups()
        types = [t.strip() for t in types.split(",")]
        return lambda grid, block, args: getattr(self, kind)(types, grid, block, args)

    def _shape(self, packed):
        assert isinstance(packed, numpy.ndarray) and packed.shape == (1,)  # a struct by value
        values = iter(numpy.frombuffer(packed.tobytes(), dtype="<i8").tolist())
        return {name: [next(values) for _ in range(n)] if n > 1 else next(values)
                for name, n in self.C_FIELDS}

    def conv_gram_dmma_kernel(self, types, grid, block, args):
        """The tensor-core tiles: the same contract, float64 Gram (the arithmetic is the CPU twin's
        to test, tests/backends/test_dmma_twin.py)."""
        assert args[1].dtype == F64
        self.conv_gram_tile_kernel([types[0], "double", types[1]], grid, block, args, kind="dmma")

    def conv_gram_tile_kernel(self, types, grid, block, args, kind="tile"):
        x, gram, packed, per_split = args
        ctype = {"float": F32, "double": F64}
        assert (ctype[types[0]], ctype[types[1]]) == (x.dtype, gram.dtype)
        assert types[2] == "sap_fast::cuda::DefaultGramTiling"
        assert block == (conv_launch.THREADS_PER_DIM, conv_launch.THREADS_PER_DIM)
        assert isinstance(per_split, numpy.int64)
        s, per_split = self._shape(packed), int(per_split)
        assert x.is_contiguous() and x.numel() == s["batch"] * s["channels"] * math.prod(s["in_size"])
        # R of every group, rows in (sample, position) order, columns in weight order
        r = unfold_gram_rows(x.reshape(s["batch"], s["channels"], *s["in_size"]), s).to(gram.dtype)
        tile, tiles = conv_launch.TILE, -(-s["width"] // conv_launch.TILE)
        pairs = [(a, b) for a in range(tiles) for b in range(a, tiles)]
        assert grid == (len(pairs), s["groups"], -(-s["rows"] // per_split))
        for (a, b), group, split in itertools.product(pairs, range(grid[1]), range(grid[2])):
            begin, end = split * per_split, min((split + 1) * per_split, s["rows"])
            assert begin < end, "an empty row range"
            rows = r[begin:end, group]
            part = rows[:, a * tile:(a + 1) * tile].T @ rows[:, b * tile:(b + 1) * tile]
            i = torch.arange(a * tile, a * tile + part.shape[0])[:, None]
            j = torch.arange(b * tile, b * tile + part.shape[1])[None, :]
            gram[group, a * tile:(a + 1) * tile, b * tile:(b + 1) * tile] += part * (i <= j)  # upper only
        self.launches.append((kind, grid, per_split))

    def mirror_upper_to_lower_kernel(self, types, grid, block, args):
        gram, width, matrices = args
        assert {"float": F32, "double": F64}[types[0]] == gram.dtype
        assert isinstance(width, numpy.int64) and (int(width), int(matrices)) == tuple(gram.shape[:2][::-1])
        assert grid == (conv_launch.mirror_blocks(int(width), int(matrices)),)
        assert block == (conv_launch.MIRROR_THREADS,)
        lower = torch.ones(int(width), int(width), dtype=torch.bool).tril(-1)
        gram[:, lower] = gram.mT[:, lower]
        self.launches.append(("mirror", grid))


def unfold_gram_rows(x, s) -> torch.Tensor:
    """(rows, groups, d) of the 3-D shape ``s`` read off the packed struct."""
    x = F.pad(x.double(), [p for i in (2, 1, 0) for p in (s["padding"][i], s["padding"][i])])
    for i in range(3):
        span = s["dilation"][i] * (s["kernel"][i] - 1) + 1
        x = x.unfold(2 + i, span, s["stride"][i])[..., :: s["dilation"][i]]
    assert list(x.shape[2:5]) == s["out_size"]
    x = x.reshape(s["batch"], s["groups"], s["group_channels"], *s["out_size"], *s["kernel"])
    return x.permute(0, 3, 4, 5, 1, 2, 6, 7, 8).reshape(s["rows"], s["groups"], s["width"])


def stand_in_conv_gram(x, kernel_size, stride, padding, dilation, groups, dtype, sm_count=2, stand_ins=None,
                       capability_major=9):
    """:func:`nvrtc.conv_gram` on the CPU: its checks, allocation, plan and launch, the kernels
    stood in, on a device of that SM count and compute capability."""
    shape = nvrtc.conv_gram_shape(x, kernel_size, stride, padding, dilation, groups, dtype)
    gram = torch.zeros((shape.groups, shape.width, shape.width), dtype=dtype)
    if shape.rows and shape.width:
        stand_ins = stand_ins or StandIns()
        plan = conv_launch.plan(shape, sm_count, capability_major, dtype)
        nvrtc.launch(stand_ins, stand_ins, x.contiguous(), gram, shape, plan, contextlib.nullcontext())
    return gram


LAUNCH_CASES = {  # (batch, channels, size, kernel, stride, padding, dilation, groups)
    "1d-k5-dil2-pad4": (2, 3, (17,), (5,), (1,), (4,), (2,), 1),
    "2d-nonsquare-stride-dil": (3, 4, (9, 8), (3, 2), (2, 1), (1, 0), (1, 2), 1),
    "2d-groups3": (2, 6, (7, 6), (3, 3), (1, 1), (1, 1), (1, 1), 3),
    "2d-depthwise-stride2": (3, 5, (7, 7), (3, 3), (2, 2), (1, 1), (1, 1), 5),
    "2d-odd-three-tiles": (2, 17, (9, 7), (3, 3), (1, 1), (1, 1), (1, 1), 1),  # d = 153
    "2d-many-rows-split-k": (20, 2, (16, 16), (3, 3), (1, 1), (1, 1), (1, 1), 1),
    "3d-stride-groups": (2, 4, (4, 5, 4), (2, 3, 2), (1, 2, 1), (1, 1, 1), (1, 1, 1), 2),
    "3d-dil-pad": (2, 3, (5, 4, 7), (3, 1, 2), (1, 1, 1), (2, 0, 1), (2, 1, 3), 1),
}


@pytest.mark.parametrize("dtypes", [(F64, F64), (F32, F64), (F32, F32), (F64, F32)])
@pytest.mark.parametrize("name", sorted(LAUNCH_CASES))
def test_the_launch_path_computes_the_gram(name, dtypes):
    batch, channels, size, kernel, stride, padding, dilation, groups = LAUNCH_CASES[name]
    g = torch.Generator().manual_seed(len(name))
    x = torch.randn(batch, channels, *size, generator=g, dtype=F64).to(dtypes[0])
    args = (list(kernel), list(stride), list(padding), list(dilation), groups)
    stand_ins = StandIns()
    got = stand_in_conv_gram(x, *args, dtypes[1], sm_count=132, stand_ins=stand_ins)
    # an sm_90 device: float64 Grams on the tensor-core tiles
    assert [step[0] for step in stand_ins.launches] == ["dmma" if dtypes[1] == F64 else "tile", "mirror"]
    assert got.dtype == dtypes[1] and torch.equal(got, got.mT)
    assert rel_err(got, unfold_gram(x, *args)) <= (1e-12 if dtypes[1] == F64 else 1e-5)
    if name == "2d-many-rows-split-k":
        assert stand_ins.launches[0][1][2] > 1  # several row ranges per tile (split-K)


@pytest.mark.parametrize("capability_major, switch, kernel", [
    (9, "auto", "dmma"), (8, "auto", "dmma"), (7, "auto", "tile"), (9, "0", "tile")])
def test_the_launch_takes_the_tensor_core_tiles_for_float64_from_sm_80(capability_major, switch, kernel,
                                                                       monkeypatch):
    monkeypatch.setenv("SAP_FAST_GRAM_DMMA", switch)
    x = torch.randn(2, 5, 6, 6, dtype=F64)
    for dtype, expected in ((F64, kernel), (F32, "tile")):
        stand_ins = StandIns()
        got = stand_in_conv_gram(x, [3, 3], [1, 1], [1, 1], [1, 1], 1, dtype, stand_ins=stand_ins,
                                 capability_major=capability_major)
        assert [step[0] for step in stand_ins.launches] == [expected, "mirror"]
        assert stand_ins.launches[0][1] == conv_launch.tile_grid(
            nvrtc.conv_gram_shape(x, [3, 3], [1, 1], [1, 1], [1, 1], 1, dtype), stand_ins.launches[0][2])
        assert rel_err(got, unfold_gram(x, [3, 3], [1, 1], [1, 1], [1, 1], 1)) <= 1e-5
    shape = nvrtc.conv_gram_shape(x, [3, 3], [1, 1], [1, 1], [1, 1], 1, F32)
    dmma_plan = dataclasses.replace(conv_launch.plan(shape, 2, 9, F32), kernel="dmma")
    with pytest.raises(ValueError, match="float64 Grams only"):
        nvrtc.launch(StandIns(), StandIns(), x.float(), torch.zeros(1, 45, 45), shape, dmma_plan,
                     contextlib.nullcontext())
    with pytest.raises(ValueError, match=r"^gram is torch.float64, the launch plan accumulates in torch.float32$"):
        nvrtc.launch(StandIns(), StandIns(), x.float(), torch.zeros(1, 45, 45, dtype=F64), shape,
                     conv_launch.plan(shape, 2, 9, F32), contextlib.nullcontext())


def test_an_empty_batch_or_no_channels_launches_nothing():
    stand_ins = StandIns()
    x = torch.randn(0, 4, 5, 5)
    assert torch.equal(stand_in_conv_gram(x, [3, 3], [1, 1], [1, 1], [1, 1], 2, F64, stand_ins=stand_ins),
                       torch.zeros(2, 18, 18, dtype=F64))
    assert stand_in_conv_gram(torch.randn(2, 0, 5), [3], [1], [1], [1], 1, F32).shape == (1, 0, 0)
    assert stand_ins.launches == []


ROUTED_CASES = ["1d-same-even-dil", "2d-nonsquare-stride-dil", "2d-groups2", "2d-depthwise", "2d-reflect",
                "2d-circular", "3d-stride-groups", "3d-dil-reflect"]


@pytest.mark.parametrize("case", ROUTED_CASES)
def test_the_cupy_route_through_collect_stats_matches_the_portable_path(case, monkeypatch):
    """gram() hands the cupy route what it hands the CMake-built op: padding modes and
    asymmetric 'same' padding applied first, groups, stride, dilation; float64 Grams agree to
    round-off (the kernels stood in on the CPU)."""
    calls = []

    def stand_in(*args):
        calls.append(args[0].shape)
        return stand_in_conv_gram(*args)
    monkeypatch.setattr(nvrtc, "conv_gram", stand_in)
    force_gram(monkeypatch, lambda call: "cupy" if call.conv and call.input_precision == "fp32" else None)
    model, x = conv_case(case, batch=3, seed=4)
    model, x = model.float(), x.float()
    got = sap_fast.collect_stats(model, x, batch_size=2)
    assert calls, "the cupy route never ran"
    rows_only(monkeypatch)
    want = sap_fast.collect_stats(model, x, batch_size=2)
    for name in want:
        if want[name].mode == "gram":
            assert got[name].mode == "gram"
            assert rel_err(got[name].gram, want[name].gram) <= 1e-12, name


# ---------------------------------------------------------------------------------------------
# batched cuSOLVER: switches, routes, and the argument handling against a stand-in binding
# ---------------------------------------------------------------------------------------------

def test_the_batched_switches_default_to_auto_and_reject_other_values(monkeypatch):
    monkeypatch.delenv("SAP_FAST_BATCHED_EIGH", raising=False)
    assert batched_linalg.eigh_choice() == "auto" and batched_linalg.cholesky_choice() == "auto"
    monkeypatch.setenv("SAP_FAST_BATCHED_CHOLESKY", "magma")
    with pytest.raises(ValueError, match=r"^SAP_FAST_BATCHED_CHOLESKY='magma': use one of \('auto', 'cupy'\)$"):
        batched_linalg.cholesky_choice()


def test_the_batched_routes():
    assert batched_linalg.eigh_route("cuda", 9, "cupy", True) == "cupy"
    assert batched_linalg.eigh_route("cuda", 32, "cupy", True) == "cupy"
    assert batched_linalg.eigh_route("cuda", 49, "cupy", True) == "default"  # ConvNeXt's 7×7: too big
    assert batched_linalg.eigh_route("cuda", 9, "auto", True) == "default"   # never by default
    assert batched_linalg.eigh_route("cuda", 9, "cupy", False) == "default"
    assert batched_linalg.eigh_route("cpu", 9, "cupy", True) == "default"
    assert batched_linalg.cholesky_route("cuda", "cupy", True) == "cupy"
    assert batched_linalg.cholesky_route("cuda", "auto", True) == "default"
    assert batched_linalg.cholesky_route("cuda", "cupy", False) == "default"


def test_by_default_nothing_asks_for_cupy(monkeypatch):
    def boom():
        raise AssertionError("cupy probed although the switch is off")
    monkeypatch.setattr(cupy_runtime, "load", boom)
    monkeypatch.delenv("SAP_FAST_BATCHED_EIGH", raising=False)
    monkeypatch.delenv("SAP_FAST_BATCHED_CHOLESKY", raising=False)
    batch = torch.eye(3).expand(4, 3, 3)
    # the cupy implementations' reasons, as the eigh and cholesky stages ask them
    assert linalg.EIGH["cupy-syevj"].not_supported_reasons(linalg.eigh_call(batch))
    assert linalg.CHOLESKY["cupy-potrf"].not_supported_reasons(linalg.cholesky_call(batch))
    monkeypatch.setenv("SAP_FAST_BATCHED_EIGH", "cupy")
    assert linalg.EIGH["cupy-syevj"].not_supported_reasons(linalg.eigh_call(batch))  # a CPU tensor


class HostCusolver:
    """cupy's cuSOLVER binding names, doing what cuSOLVER documents, on host memory (CPU tensors'
    pointers): column-major matrices, the triangle ``uplo`` names, results written in place."""
    LOWER, UPPER = 0, 1

    def __init__(self):
        self.params, self.sort, self.calls = set(), None, []

    @staticmethod
    def _array(pointer, count, dtype):
        ctype = {numpy.float64: ctypes.c_double, numpy.float32: ctypes.c_float,
                 numpy.int32: ctypes.c_int32, numpy.int64: ctypes.c_int64}[dtype]
        return numpy.ctypeslib.as_array((ctype * count).from_address(pointer))

    def createSyevjInfo(self):
        self.params.add(7)
        return 7

    def destroySyevjInfo(self, params):
        self.params.remove(params)

    def xsyevjSetSortEig(self, params, sort):
        self.sort = sort

    def _syevj_buffer(self, handle, jobz, uplo, n, a, lda, w, params, batch):
        assert params in self.params and jobz == 1 and lda == n
        return 5

    def _syevj(self, dtype, handle, jobz, uplo, n, a, lda, w, work, lwork, info, params, batch):
        assert params in self.params and self.sort == 1 and lwork == 5 and work
        self.calls.append(("syevj", uplo, n, batch))
        mats = self._array(a, batch * n * n, dtype).reshape(batch, n, n)  # [b, col, row]
        values = self._array(w, batch * n, dtype).reshape(batch, n)
        for b in range(batch):
            col_major = mats[b].T.astype(numpy.float64)  # element (row, col)
            tri = numpy.tril(col_major) if uplo == self.LOWER else numpy.triu(col_major)
            sym = tri + tri.T - numpy.diag(numpy.diag(tri))
            e, v = numpy.linalg.eigh(sym)
            values[b] = e
            mats[b] = v.T  # column k of V at offsets k·n …
        self._array(info, batch, numpy.int32)[:] = 0

    def _potrf(self, dtype, handle, uplo, n, pointers, lda, info, batch):
        assert lda == n
        self.calls.append(("potrf", uplo, n, batch))
        infos = self._array(info, batch, numpy.int32)
        for b, pointer in enumerate(self._array(pointers, batch, numpy.int64).tolist()):
            buffer = self._array(pointer, n * n, dtype).reshape(n, n)  # [col, row]
            a = buffer.T.astype(numpy.float64)
            tri = numpy.triu(a) if uplo == self.UPPER else numpy.tril(a)
            sym = tri + tri.T - numpy.diag(numpy.diag(tri))
            try:
                u = numpy.linalg.cholesky(sym).T  # sym = Uᵀ U
                infos[b] = 0
            except numpy.linalg.LinAlgError:
                minors = [k for k in range(1, n + 1) if numpy.linalg.eigvalsh(sym[:k, :k]).min() <= 0]
                infos[b], u = minors[0], numpy.triu(a)
            keep = numpy.triu(numpy.ones((n, n), bool)) if uplo == self.UPPER else numpy.tril(numpy.ones((n, n), bool))
            buffer.T[keep] = u[keep]  # only the named triangle is written

    def __getattr__(self, name):
        prefix, rest = name[0], name[1:]
        dtype = {"s": numpy.float32, "d": numpy.float64}[prefix]
        if rest == "syevjBatched_bufferSize":
            return self._syevj_buffer
        if rest == "syevjBatched":
            return lambda *a: self._syevj(dtype, *a)
        if rest == "potrfBatched":
            return lambda *a: self._potrf(dtype, *a)
        raise AttributeError(name)


def _spd_batch(batch, n, dtype, seed=0, garbage=True):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(batch, n, 2 * n, generator=g, dtype=F64)
    m = a @ a.mT / n + 0.1 * torch.eye(n, dtype=F64)
    if garbage:  # only the lower triangle may be read
        m = m.tril() + torch.randn(batch, n, n, generator=g, dtype=F64).triu(1) * 1e3
    return m.to(dtype)


@pytest.mark.parametrize("dtype", [F64, F32])
def test_syevj_batched_handles_layout_triangle_and_order_like_torch_eigh(dtype):
    gram = _spd_batch(6, 9, dtype)
    lib = HostCusolver()
    values, vectors, info = batched_linalg.syevj_batched(lib, 0, gram)
    want_values, _ = torch.linalg.eigh(gram.double())  # UPLO="L"
    tol = 1e-12 if dtype == F64 else 1e-5
    assert values.dtype == vectors.dtype == dtype and vectors.is_contiguous()
    assert rel_err(values, want_values) <= tol
    sym = gram.double().tril() + gram.double().tril(-1).mT
    assert rel_err(vectors.double() @ torch.diag_embed(values.double()) @ vectors.double().mT, sym) <= tol
    assert torch.equal(info, torch.zeros(6, dtype=torch.int32)) and not lib.params  # params destroyed
    assert lib.calls == [("syevj", HostCusolver.LOWER, 9, 6)]
    one_values, one_vectors, _ = batched_linalg.syevj_batched(lib, 0, gram[2])  # (n, n) in, (n,) out
    assert one_values.shape == (9,) and one_vectors.shape == (9, 9)
    assert rel_err(one_values, want_values[2]) <= tol


def test_syevj_batched_arguments():
    lib = HostCusolver()
    with pytest.raises(ValueError, match=r"^eigh: syevjBatched takes n ≤ 32, got n = 49; use torch.linalg.eigh$"):
        batched_linalg.syevj_batched(lib, 0, torch.zeros(96, 49, 49))
    with pytest.raises(ValueError, match=r"^eigh: gram must be \(n, n\) or \(B, n, n\), got shape \(2, 3, 4\)$"):
        batched_linalg.syevj_batched(lib, 0, torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match=r"^eigh: gram must be float32 or float64, got torch.float16"):
        batched_linalg.syevj_batched(lib, 0, torch.zeros(2, 3, 3, dtype=torch.float16))
    values, vectors, info = batched_linalg.syevj_batched(lib, 0, torch.zeros(0, 5, 5))
    assert values.shape == (0, 5) and vectors.shape == (0, 5, 5) and not lib.calls


@pytest.mark.parametrize("dtype", [F64, F32])
def test_potrf_batched_is_cholesky_ex(dtype):
    m = _spd_batch(5, 7, dtype, seed=3)
    lib = HostCusolver()
    factor, info = batched_linalg.potrf_batched(lib, 0, m)
    want, want_info = torch.linalg.cholesky_ex(m)
    assert factor.dtype == dtype and torch.equal(factor, factor.tril())
    assert rel_err(factor, want) <= (1e-12 if dtype == F64 else 1e-5)
    assert torch.equal(info, want_info) and lib.calls == [("potrf", HostCusolver.UPPER, 7, 5)]
    one, one_info = batched_linalg.potrf_batched(lib, 0, m[1])
    assert one.shape == (7, 7) and one_info.dim() == 0 and rel_err(one, want[1]) <= 1e-5


def test_potrf_batched_reports_the_failing_minor_per_matrix():
    m = _spd_batch(4, 5, F64, garbage=False)
    m[2, 3, 3] = -50.0  # the leading 4×4 minor of matrix 2 is indefinite
    factor, info = batched_linalg.potrf_batched(HostCusolver(), 0, m)
    assert info.tolist() == torch.linalg.cholesky_ex(m).info.tolist() == [0, 0, 4, 0]
    with pytest.raises(ValueError, match=r"^cholesky_ex: m must be \(n, n\) or \(B, n, n\), got shape \(5,\)$"):
        batched_linalg.potrf_batched(HostCusolver(), 0, torch.zeros(5))


def test_the_entry_points_want_cuda_tensors_and_say_why_cupy_cannot_run(monkeypatch):
    with pytest.raises(ValueError, match=r"^eigh \(cupy\): expected a CUDA tensor, got one on cpu$"):
        batched_linalg.eigh(torch.eye(3))
    with pytest.raises(ValueError, match=r"^cholesky_ex \(cupy\): expected a CUDA tensor"):
        batched_linalg.cholesky_ex(torch.eye(3))


def test_check_info_names_the_first_bad_matrix():
    batched_linalg.check_info(torch.zeros(3, dtype=torch.int32), "eigh")
    with pytest.raises(RuntimeError, match=r"^eigh did not converge for matrix 1 \(cuSOLVER info 9\)"):
        batched_linalg.check_info(torch.tensor([0, 9, 3], dtype=torch.int32), "eigh")
    with pytest.raises(RuntimeError, match=r"rejected argument 4"):
        batched_linalg.check_info(torch.tensor([-4], dtype=torch.int32), "eigh")


def test_the_spectrum_and_solve_stages_take_the_batched_calls_when_asked(monkeypatch):
    """The wiring in sap_fast.spectrum / sap_fast.solve: what comes back from the batched calls
    (stood in on the CPU) gives the stages the results of the default route."""
    from sap_fast import solve, spectrum
    from sap_fast.stats import LayerStats

    gram = _spd_batch(8, 9, F64, garbage=False)
    record = LayerStats(d=9, groups=8)
    record.add_gram(gram, rows=100)
    assert record.mode == "gram"
    want = spectrum.layer_spectrum(record)
    used = []
    monkeypatch.setattr(batched_linalg, "eigh_reasons", lambda *a, **k: used.append("eigh") or [])
    monkeypatch.setattr(batched_linalg, "eigh",
                        lambda g: batched_linalg.syevj_batched(HostCusolver(), 0, g)[:2])
    got = spectrum.layer_spectrum(record)
    assert rel_err(got.eigvals, want.eigvals) <= 1e-12
    assert rel_err(got.basis @ torch.diag_embed(got.eigvals) @ got.basis.mT, gram) <= 1e-12
    weight = torch.randn(8, 3, 9, dtype=F64)
    prep = solve.prepare(record, weight)
    want_w, _ = solve.solved_weight(prep, 100.0)
    monkeypatch.setattr(batched_linalg, "cholesky_reasons", lambda *a, **k: used.append("cholesky") or [])
    monkeypatch.setattr(batched_linalg, "cholesky_ex", lambda m: batched_linalg.potrf_batched(HostCusolver(), 0, m))
    got_w, info = solve.solved_weight(prep, 100.0)
    assert rel_err(got_w, want_w) <= 1e-12 and not info.any()
    assert used == ["eigh", "cholesky"]


# ---------------------------------------------------------------------------------------------
# on a GPU with cupy (skipped elsewhere): what the CPU cannot show
# ---------------------------------------------------------------------------------------------

def _has_cmake_cuda_op() -> bool:
    from sap_fast.backends.native import native_cuda
    return native_cuda()


@requires_cupy_gpu
@pytest.mark.parametrize("dtypes", [(F64, F64), (F32, F64), (F32, F32), (F64, F32)])
@pytest.mark.parametrize("name", sorted(LAUNCH_CASES))
def test_gpu_nvrtc_kernel_matches_the_oracle_and_the_cmake_built_kernel(name, dtypes):
    """Against the unfold oracle (1e-12 in float64, 1e-4 in float32), and against the
    CMake-built op where it is built: bitwise in float64 when each tile has one row range (each
    entry is then one thread's sum, added once to zero), else to the atomics' reordering."""
    batch, channels, size, kernel, stride, padding, dilation, groups = LAUNCH_CASES[name]
    g = torch.Generator().manual_seed(len(name))
    x = torch.randn(batch, channels, *size, generator=g, dtype=F64).to(dtypes[0]).cuda()
    args = (list(kernel), list(stride), list(padding), list(dilation), groups)
    got = nvrtc.conv_gram(x, *args, dtypes[1])
    assert got.device == x.device and got.dtype == dtypes[1] and torch.equal(got, got.mT)
    assert rel_err(got.cpu(), unfold_gram(x.cpu(), *args)) <= (1e-12 if dtypes[1] == F64 else 1e-4)
    if _has_cmake_cuda_op():
        cmake = torch.ops.sap_fast.conv_gram(x, *args, dtypes[1])
        shape = nvrtc.conv_gram_shape(x, *args, dtypes[1])
        per = conv_launch.device_plan(shape, x.device, dtypes[1]).rows_per_split
        if dtypes[1] == F64 and per >= shape.rows:
            assert torch.equal(got, cmake), "NVRTC and nvcc builds differ bitwise"
        else:
            assert rel_err(got, cmake) <= (1e-14 if dtypes[1] == F64 else 1e-6)


@requires_cupy_gpu
@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_gpu_cupy_route_matches_the_portable_path_on_the_conv_zoo(case, monkeypatch):
    """SAP_FAST_GRAM_KERNEL=cupy through collect_stats, padding modes and all, to 1e-12."""
    model, x = conv_case(case, batch=6, seed=4)
    model, x = model.float().cuda(), x.float().cuda()
    monkeypatch.setenv("SAP_FAST_GRAM_KERNEL", "cupy")
    calls = []
    real = nvrtc.conv_gram
    monkeypatch.setattr(nvrtc, "conv_gram", lambda *a: calls.append(1) or real(*a))
    got = sap_fast.collect_stats(model, x, batch_size=4)
    assert calls, "the cupy route never ran"
    rows_only(monkeypatch)
    want = sap_fast.collect_stats(model, x, batch_size=4)
    for name in want:
        if want[name].mode == "gram":
            assert rel_err(got[name].gram.cpu(), want[name].gram.cpu()) <= 1e-12, name


@requires_cupy_gpu
def test_gpu_nvrtc_kernel_runs_on_the_current_stream_without_host_sync():
    batch, channels, size, kernel, stride, padding, dilation, groups = LAUNCH_CASES["2d-many-rows-split-k"]
    x = torch.randn(batch, channels, *size, dtype=F32, device="cuda")
    args = (list(kernel), list(stride), list(padding), list(dilation), groups)
    nvrtc.conv_gram(x, *args, F64)  # compiled (or loaded from the cache) before the checks
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.stream(side):
            got = nvrtc.conv_gram(x, *args, F64)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    side.synchronize()  # only the side stream: the kernels must have been queued there
    assert rel_err(got.cpu(), unfold_gram(x.cpu(), *args)) <= 1e-12


@requires_cupy_gpu
def test_gpu_nvrtc_kernel_runs_the_plan_it_is_given():
    """Other whole-chunk splits than the default plan's, on both tile kernels: the same Gram."""
    batch, channels, size, kernel, stride, padding, dilation, groups = LAUNCH_CASES["2d-many-rows-split-k"]
    x = torch.randn(batch, channels, *size, dtype=F32, device="cuda")
    args = (list(kernel), list(stride), list(padding), list(dilation), groups)
    shape = nvrtc.conv_gram_shape(x, *args, F64)
    default = conv_launch.device_plan(shape, x.device, F64)
    for rows_per_split, kernel_kind in itertools.product([16, 48, -(-shape.rows // 16) * 16], ["fma", "dmma"]):
        plan = dataclasses.replace(default, kernel=kernel_kind, rows_per_split=rows_per_split,
                                   grid=conv_launch.tile_grid(shape, rows_per_split))
        got = nvrtc.conv_gram(x, *args, F64, plan=plan)
        assert rel_err(got.cpu(), unfold_gram(x.cpu(), *args)) <= 1e-12, (rows_per_split, kernel_kind)


@requires_cupy_gpu
@pytest.mark.parametrize("n, batch", [(9, 40), (25, 24), (32, 96)])
def test_gpu_syevj_batched_matches_torch_eigh(n, batch):
    if batched_linalg.load()[0] is None:
        pytest.skip(f"cuSOLVER through cupy: {batched_linalg.load()[1]}")
    gram = _spd_batch(batch, n, F64, garbage=True).cuda()
    values, vectors = batched_linalg.eigh(gram)
    want, _ = torch.linalg.eigh(gram)
    assert rel_err(values.cpu(), want.cpu()) <= 1e-10
    sym = gram.tril() + gram.tril(-1).mT
    assert rel_err(vectors @ torch.diag_embed(values) @ vectors.mT, sym) <= 1e-10


@requires_cupy_gpu
def test_gpu_potrf_batched_matches_cholesky_ex():
    if batched_linalg.load()[0] is None:
        pytest.skip(f"cuSOLVER through cupy: {batched_linalg.load()[1]}")
    m = _spd_batch(96, 49, F64, seed=2).cuda()
    m[5, 10, 10] = -1e3
    factor, info = batched_linalg.cholesky_ex(m)
    want, want_info = torch.linalg.cholesky_ex(m)
    ok = want_info == 0
    assert torch.equal(info, want_info)
    assert rel_err(factor[ok], want[ok]) <= 1e-12


class StreamedCupy:
    """The parts of cupy that :func:`batched_linalg.on_stream` touches, on the host: a current
    device, a current stream (``Stream.from_external`` entered as a context, as cupy's is) and
    one cuSOLVER handle."""

    def __init__(self):
        self.device, self.current = None, "cupy-default-stream"
        outer = self

        class Device:
            def __init__(self, index):
                self.index = index

            def __enter__(self):
                self.before, outer.device = outer.device, self.index

            def __exit__(self, *exc):
                outer.device = self.before

        class Stream:
            @staticmethod
            def from_external(torch_stream):
                @contextlib.contextmanager
                def current():
                    before, outer.current = outer.current, torch_stream.cuda_stream
                    try:
                        yield
                    finally:
                        outer.current = before
                return current()

        class Namespace:
            pass

        self.cuda = Namespace()
        self.cuda.Device, self.cuda.Stream = Device, Stream
        self.cuda.device = Namespace()
        self.cuda.device.get_cusolver_handle = lambda: ("handle", outer.device)


class ResettingCusolver(HostCusolver):
    """HostCusolver that does what cupy's wrappers do: every call first sets the handle's stream
    to cupy's *current* stream (overriding any stream set on the handle before), and records it."""

    def __init__(self, cp):
        super().__init__()
        self.cp, self.handle_stream, self.streams = cp, None, []

    def setStream(self, handle, stream):
        self.handle_stream = stream

    def __getattr__(self, name):
        call = super().__getattr__(name)

        def reset_then_call(*args):
            self.handle_stream = self.cp.current  # cupy's _setStream(handle) on every call
            self.streams.append(self.handle_stream)
            return call(*args)
        return reset_then_call


class TorchStream:
    """torch.cuda.Stream's two attributes that cupy's stream protocol reads."""
    cuda_stream, device_index = 0x5EED, 0

    def __cuda_stream__(self):
        return (0, self.cuda_stream)


@pytest.mark.parametrize("dtype", [F64, F32])
def test_batched_calls_run_on_torchs_stream_though_cupy_resets_the_handle_each_call(dtype):
    cp = StreamedCupy()
    lib = ResettingCusolver(cp)
    gram = _spd_batch(3, 5, dtype)
    with batched_linalg.on_stream(cp, lib, 0, TorchStream()) as handle:
        assert handle == ("handle", 0)  # the handle of the tensor's device
        values, _, _ = batched_linalg.syevj_batched(lib, handle, gram)
        batched_linalg.potrf_batched(lib, handle, gram @ gram.mT + torch.eye(5, dtype=dtype))
    assert len(lib.streams) >= 2 and set(lib.streams) == {TorchStream.cuda_stream}  # every call: torch's
    assert cp.current == "cupy-default-stream" and cp.device is None       # restored after the block
    assert rel_err(values, torch.linalg.eigvalsh(gram.double())) <= (1e-12 if dtype == F64 else 1e-5)
    # what the old code did: set the stream on the handle once, outside cupy's stream context
    lib.setStream(("handle", 0), TorchStream.cuda_stream)
    batched_linalg.syevj_batched(lib, ("handle", 0), gram)
    assert lib.streams[-1] == "cupy-default-stream"  # the reset wins: the stand-in can tell them apart
