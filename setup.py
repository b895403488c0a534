"""Build script: the pure-Python package always; ``fasttangent._C`` from ``csrc/``
when a CUDA toolchain and a CUDA-enabled torch are present.

``FASTTANGENT_BUILD_CUDA=1`` forces the extension (a missing toolchain or a failed
compile is an error), ``FASTTANGENT_BUILD_CUDA=0`` skips it, unset means "build if
possible": a failed compile then only warns and the package installs without it
(the ``backend="cuda"`` paths then say the extension is missing).

Compile time is kept low: the ``.cu`` files include only the CUDA runtime (torch
headers are confined to ``csrc/bindings.cpp``) and only sm_90 code plus compute_90
PTX (which newer GPUs JIT-compile) is generated.
"""
import glob
import os
import shutil
import sys

from setuptools import setup

GENCODE = [
    "-gencode=arch=compute_90,code=sm_90",
    "-gencode=arch=compute_90,code=compute_90",  # PTX fallback for newer GPUs
]


def _cuda_home_candidates():
    nvcc = shutil.which("nvcc")
    if nvcc:
        yield os.path.dirname(os.path.dirname(nvcc))
        # nvcc on PATH may be a wrapper or a link (e.g. /usr/local/bin/nvcc -> cuda-13.0)
        yield os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    yield "/usr/local/cuda"
    yield from sorted(glob.glob("/usr/local/cuda-*"), reverse=True)


def _locate_cuda_home():
    """Set CUDA_HOME to a toolkit with both nvcc and headers, unless the user set it.

    torch guesses CUDA_HOME from the directory of the first ``nvcc`` on PATH; when that
    is a wrapper script outside the toolkit, its guess has no ``include/cuda_runtime.h``
    and the C++ side of the build cannot find the CUDA headers.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    for home in _cuda_home_candidates():
        if os.path.isfile(os.path.join(home, "bin", "nvcc")) and os.path.isfile(
                os.path.join(home, "include", "cuda_runtime.h")):
            os.environ["CUDA_HOME"] = home
            return


def _want_cuda():
    """(build the extension?, was it forced?) from FASTTANGENT_BUILD_CUDA and the toolchain."""
    flag = os.environ.get("FASTTANGENT_BUILD_CUDA", "").strip()
    if flag == "0":
        return False, False
    forced = flag == "1"
    _locate_cuda_home()
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError:
        if forced:
            raise RuntimeError(
                "FASTTANGENT_BUILD_CUDA=1 but torch is not importable in the build "
                "environment; install torch first and build with --no-build-isolation."
            )
        return False, False
    has_nvcc = CUDA_HOME is not None and os.path.isfile(os.path.join(CUDA_HOME, "bin", "nvcc"))
    has_cuda_torch = torch.version.cuda is not None
    has_sources = bool(glob.glob("csrc/*.cu"))
    if forced and not (has_nvcc and has_cuda_torch and has_sources):
        raise RuntimeError(
            f"FASTTANGENT_BUILD_CUDA=1 but nvcc found={has_nvcc} (CUDA_HOME={CUDA_HOME!r}), "
            f"torch CUDA build={torch.version.cuda!r}, csrc/*.cu present={has_sources}; install the "
            "CUDA toolkit (or set CUDA_HOME) and a CUDA build of torch, or set FASTTANGENT_BUILD_CUDA=0."
        )
    return has_nvcc and has_cuda_torch and has_sources, forced


def _runtime_library_dirs():
    """Directories of the shared libraries fasttangent._C links against, as torch loads them.

    Recorded as the module's rpath so that ``import fasttangent._C`` works even before
    ``import torch`` (which otherwise is what puts libc10 and libcudart in the process).
    libcudart is taken from where torch itself loads it (a pip wheel, usually), so both
    share one copy.
    """
    import torch
    from torch.utils.cpp_extension import TORCH_LIB_PATH

    dirs = [TORCH_LIB_PATH]
    try:
        with open("/proc/self/maps") as maps:  # Linux: the files this process has mapped
            cudart = {line.split()[-1] for line in maps if "/libcudart.so" in line}
    except OSError:
        cudart = set()
    dirs += sorted({os.path.dirname(path) for path in cudart})
    return dirs


def _extensions():
    build, forced = _want_cuda()
    if not build:
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    class OptionalBuildExtension(BuildExtension):
        """Unless the build is forced, a failed compile warns instead of failing the install."""

        def run(self):
            try:
                super().run()
            except Exception as error:  # compiler errors surface as assorted distutils/setuptools types
                if forced:
                    raise
                print(f"WARNING: fasttangent._C was not built ({error}); the package installs without "
                      "its CUDA kernels. Set FASTTANGENT_BUILD_CUDA=1 to make this an error.", file=sys.stderr)

    ext = CUDAExtension(
        name="fasttangent._C",
        sources=sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*.cu")),
        depends=sorted(glob.glob("csrc/*.h")),
        extra_compile_args={"cxx": ["-O3", "-g0"], "nvcc": ["-O3", "--use_fast_math", *GENCODE]},
        extra_link_args=[f"-Wl,-rpath,{path}" for path in _runtime_library_dirs()],
    )
    return [ext], {"build_ext": OptionalBuildExtension}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
