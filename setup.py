"""The native build of sap_fast (the package's metadata is in pyproject.toml).

Install without build isolation, so the build compiles against the torch already installed:
    pip install torch==2.13.0                      # CPU; on a GPU machine keep its own torch
    pip install pybind11 ninja "setuptools>=64" wheel
    pip install --no-build-isolation -e ".[test]"

The native module ``sap_fast._C`` is built by CMake (CMakeLists.txt, with cmake/ for the CUDA
libraries, is the only build description; this file only drives it). With CUDA, cuSOLVER and
NVRTC come from the toolkit, else from the nvidia wheels beside a pip-installed torch
(site-packages/nvidia/cu13); build_info() reports the architectures built. Environment:
    SAP_FAST_NATIVE=0        skip the native build (pure Python; every stage uses the torch path)
    SAP_FAST_CUDA=0|1        CUDA kernels off/on (default: on when torch has CUDA and nvcc exists)
    TORCH_CUDA_ARCH_LIST     e.g. "9.0" (Hopper); default: the visible GPU's, else 9.0
    MAX_JOBS                 parallel compile jobs
    SAP_FAST_DEBUG=1         -O0 -g build
"""
import glob
import os
import shutil
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    """An on/off environment switch: True, False, or None when unset."""
    value = os.environ.get(name, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value in ("1", "on", "true", "yes"):
        return True
    if value in ("0", "off", "false", "no"):
        return False
    raise SystemExit(f"{name}={os.environ[name]!r}: use 0 or 1")


def _nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidate = os.path.join(home, "bin", "nvcc") if home else None
    return candidate if candidate and os.path.exists(candidate) else shutil.which("nvcc")


def _cuda_arch_names(torch):
    """TORCH_CUDA_ARCH_LIST ("8.0;9.0+PTX"), else the visible GPUs', else Hopper ("9.0").
    An absent GPU is never probed (torch's own arch detection fails without one)."""
    text = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    names = [a for a in text.replace(",", ";").replace(" ", ";").split(";") if a]
    if not names and torch.cuda.is_available():
        names = sorted({"%d.%d" % torch.cuda.get_device_capability(i)
                        for i in range(torch.cuda.device_count())})
    return names or ["9.0"]


def _cmake_cuda_archs(names):
    """CMake's spelling: "8.0;9.0+PTX" -> "80-real;90" (PTX kept only where asked)."""
    archs = []
    for name in names:
        number = name.replace("+PTX", "").replace(".", "")
        archs.append(number if name.endswith("+PTX") else number + "-real")
    return ";".join(archs)


def cmake_configure(build_dir, out_dir, torch_cmake_prefix, cuda, nvcc=None, arch_names=(), debug=False):
    """The CMake configure command of the native build and the environment changes it needs, as
    ``(argv after cmake, {variable: value})``. Also used by tools/check_cuda_build.sh, which
    configures against a CUDA torch that is not the one installed."""
    import pybind11

    args = [
        "-S", ROOT, "-B", build_dir, "-G", "Ninja",
        f"-DCMAKE_BUILD_TYPE={'Debug' if debug else 'Release'}",
        f"-DCMAKE_PREFIX_PATH={torch_cmake_prefix}",
        f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
        f"-DPython_EXECUTABLE={sys.executable}",
        f"-DSAP_FAST_OUTPUT_DIR={out_dir}",
        f"-DSAP_FAST_CUDA={'ON' if cuda else 'OFF'}",
    ]
    env = {}
    if cuda:
        args += [f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DCMAKE_CUDA_ARCHITECTURES={_cmake_cuda_archs(arch_names)}"]
        # torch's CMake config adds the -gencode flags from this variable (and turns
        # CMAKE_CUDA_ARCHITECTURES off); without it it guesses, and may pick architectures this
        # nvcc no longer compiles. CMakeLists.txt reports what was built in build_info().
        env["TORCH_CUDA_ARCH_LIST"] = ";".join(arch_names)
    return args, env


def run_cmake_configure(cmake, args, env):
    """Runs the configure, its output shown as it comes; a failure ends with CMake's own
    one-line reason when CMakeLists.txt gave one (a line starting "sap_fast:")."""
    process = subprocess.Popen([cmake, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, errors="replace")
    reasons = []
    for line in process.stdout:
        sys.stdout.write(line)
        if line.startswith("sap_fast:"):
            reasons.append(line.strip())
    if process.wait() != 0:
        raise SystemExit(reasons[0] if reasons else
                         f"sap_fast: the CMake configure failed (exit {process.returncode}); its error is above")


class CMakeBuild(build_ext):
    """build_ext that configures and builds CMakeLists.txt with ninja into the extension's path."""

    def run(self):
        if _flag("SAP_FAST_NATIVE") is False:
            print("sap_fast: SAP_FAST_NATIVE=0, skipping the native build (portable torch path)")
            return
        for ext in self.extensions:
            self.build_cmake(ext)

    def build_cmake(self, ext):
        try:
            import pybind11  # noqa: F401  (cmake_configure reads its CMake dir)
            import torch
        except ImportError as err:
            raise SystemExit(f"sap_fast: the native build needs torch and pybind11 installed first ({err}); "
                             "then `pip install --no-build-isolation -e .`") from None

        cmake = shutil.which("cmake")
        if cmake is None:
            raise SystemExit("sap_fast: cmake not found; `pip install cmake` (or set SAP_FAST_NATIVE=0 "
                             "to install without the native kernels)")
        want_cuda = _flag("SAP_FAST_CUDA")
        nvcc = _nvcc()
        has_cuda_torch = torch.version.cuda is not None
        if want_cuda and not (has_cuda_torch and nvcc):
            raise SystemExit("sap_fast: SAP_FAST_CUDA=1 needs a CUDA build of torch and nvcc "
                             f"(torch.version.cuda={torch.version.cuda}, nvcc={nvcc})")
        cuda = bool(has_cuda_torch and nvcc) if want_cuda is None else want_cuda

        out_dir = os.path.dirname(os.path.abspath(self.get_ext_fullpath(ext.name)))
        build_dir = os.path.join(ROOT, "build", "native-" + ("cuda" if cuda else "cpu"))
        args, changes = cmake_configure(build_dir, out_dir, torch.utils.cmake_prefix_path, cuda, nvcc,
                                        _cuda_arch_names(torch) if cuda else (), bool(_flag("SAP_FAST_DEBUG")))
        env = {**os.environ, **changes}
        print(f"sap_fast: native build ({'CPU + CUDA' if cuda else 'CPU only'}) in {build_dir}")
        run_cmake_configure(cmake, args, env)
        build = [cmake, "--build", build_dir]
        if os.environ.get("MAX_JOBS"):
            build += ["--parallel", os.environ["MAX_JOBS"]]
        subprocess.run(build, check=True, env=env)


class BuildPyWithKernelSources(build_py):
    """build_py that also ships the CUDA kernel sources which sap_fast/backends/nvrtc.py compiles
    at run time (cupy + NVRTC, for machines without nvcc): csrc/cuda/*.cuh are copied into the
    built package as sap_fast/backends/csrc/cuda/, so an installed wheel finds them. The source
    tree keeps one copy, csrc/, which the CMake build reads and an editable install finds in
    place: nothing is copied for an editable install."""

    KERNEL_DIR = os.path.join("sap_fast", "backends", "csrc", "cuda")

    def _kernel_sources(self):
        return sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cuh")))

    def _kernel_targets(self):
        if getattr(self, "editable_mode", False):
            return []
        return [os.path.join(self.build_lib, self.KERNEL_DIR, os.path.basename(source))
                for source in self._kernel_sources()]

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        if not self._kernel_sources():
            self.warn("csrc/cuda/*.cuh not found: the package will not ship the kernel sources "
                      "(the cupy/NVRTC Gram kernel will be unavailable)")
        for source, target in zip(self._kernel_sources(), self._kernel_targets()):
            self.mkpath(os.path.dirname(target))
            self.copy_file(source, target, preserve_mode=False)

    def get_outputs(self, include_bytecode=True):
        return super().get_outputs(include_bytecode) + self._kernel_targets()


if __name__ == "__main__":  # as pip's build backend and `python setup.py` run it; not on import
    setup(
        # metadata, dependencies and extras: pyproject.toml; this only adds the native module and
        # the kernel sources the cupy backend compiles
        ext_modules=[Extension("sap_fast._C", sources=[])],  # built by CMakeBuild
        cmdclass={"build_ext": CMakeBuild, "build_py": BuildPyWithKernelSources},
    )
