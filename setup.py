"""Build script: the pure-Python package always; ``fasttangent._C`` from ``csrc/``
when a CUDA toolchain and a CUDA-enabled torch are present.

``FASTTANGENT_BUILD_CUDA=1`` forces the extension (a failure is an error),
``FASTTANGENT_BUILD_CUDA=0`` skips it, unset means "build if possible".
"""
import glob
import os
import shutil

from setuptools import setup


def _want_cuda():
    flag = os.environ.get("FASTTANGENT_BUILD_CUDA", "").strip()
    if flag == "0":
        return False, False
    forced = flag == "1"
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
    has_nvcc = CUDA_HOME is not None or shutil.which("nvcc") is not None
    has_cuda_torch = torch.version.cuda is not None
    if forced and not (has_nvcc and has_cuda_torch):
        raise RuntimeError(
            f"FASTTANGENT_BUILD_CUDA=1 but nvcc found={has_nvcc}, torch CUDA build="
            f"{torch.version.cuda!r}; install the CUDA toolkit and a CUDA build of torch."
        )
    return has_nvcc and has_cuda_torch and bool(glob.glob("csrc/*.cu")), forced


def _extensions():
    build, _ = _want_cuda()
    if not build:
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    gencode = [
        "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90,code=compute_90",  # PTX fallback for newer GPUs
    ]
    ext = CUDAExtension(
        name="fasttangent._C",
        sources=sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*.cu")),
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math", *gencode]},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
