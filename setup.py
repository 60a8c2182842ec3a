"""Build flashback_ext._C: CPU + CUDA kernels when torch and nvcc allow it, CPU-only otherwise.

Environment knobs:
  FLASHBACK_CPU_ONLY=1     build the CPU kernels only, even with a CUDA torch and nvcc.
  TORCH_CUDA_ARCH_LIST     GPU architectures (default "9.0": H100/H200); e.g. "8.0;9.0".
  CUDA_HOME                CUDA toolkit root (default: derived from the `nvcc` on PATH).
  MAX_JOBS                 parallel compile jobs (default: number of CPUs).
  FLASHBACK_PTXAS_VERBOSE=1  print the register/spill report of every CUDA kernel.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def _toolkit_root_from_nvcc() -> str | None:
    """Find the CUDA toolkit root behind the `nvcc` on PATH, following wrapper scripts."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    real = Path(os.path.realpath(nvcc))
    try:
        head = real.read_bytes()[:4096]
    except OSError:
        head = b""
    if head.startswith(b"#!"):  # a wrapper script: look for the real nvcc it execs
        match = re.search(rb"(/\S+)/bin/nvcc", head)
        if match:
            return match.group(1).decode()
    return str(real.parent.parent)


def _configure_cuda_env() -> bool:
    """Set CUDA_HOME / TORCH_CUDA_ARCH_LIST / MAX_JOBS defaults; return whether to build CUDA."""
    if os.environ.get("FLASHBACK_CPU_ONLY", "0") == "1":
        return False
    if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ:
        root = _toolkit_root_from_nvcc()
        if root is None:
            return False
        os.environ["CUDA_HOME"] = root
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    return True


os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
WANT_CUDA = _configure_cuda_env()

# torch reads CUDA_HOME when cpp_extension is imported, so the environment is set up first.
import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

WITH_CUDA = WANT_CUDA and torch.version.cuda is not None
if WANT_CUDA and not WITH_CUDA:
    print("flashback_ext: torch has no CUDA support; building the CPU kernels only", file=sys.stderr)

cpu_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
cxx_flags = ["-O3", "-fopenmp"]
if os.uname().machine == "x86_64":
    cxx_flags += ["-mavx2", "-mfma"]  # every x86 box we target has them; loops auto-vectorise
link_flags = ["-fopenmp"]

if WITH_CUDA:
    nvcc_flags = ["-O3", "-lineinfo", "--expt-relaxed-constexpr",
                  "-diag-suppress", "3189"]
    if os.environ.get("FLASHBACK_PTXAS_VERBOSE") == "1":
        nvcc_flags.append("-Xptxas=-v")
    include_dirs = []
    # the CUDA 13 wheels carry headers (cuBLAS etc.) that a trimmed local toolkit may lack
    for sp in {os.path.dirname(os.path.dirname(torch.__file__))}:
        cu13 = os.path.join(sp, "nvidia", "cu13", "include")
        if os.path.isdir(cu13):
            include_dirs.append(cu13)
    ext = CUDAExtension(
        "flashback_ext._C",
        cpu_sources + cuda_sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=link_flags,
    )
else:
    ext = CppExtension("flashback_ext._C", cpu_sources,
                       extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)

setup(
    name="flashback_ext",
    version="0.1.0",
    description="FlashBack retrieval-augmented generation with KV-cache reuse: C++/CUDA ops and tools",
    packages=find_packages(include=["flashback_ext", "flashback_ext.*"]),
    package_data={"flashback_ext": ["adapters/*/*.json", "adapters/*/*.safetensors",
                                    "adapters/*/*.jinja", "adapters/*/*.md"]},
    python_requires=">=3.10",
    install_requires=["torch", "numpy", "transformers", "tqdm", "bm25s", "faiss-cpu"],
    entry_points={"console_scripts": ["flashback=flashback_ext.cli:main"]},
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
