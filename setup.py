"""Build script for dynexec.

The C++/CUDA extension ``dynexec._C`` is built from csrc/ (see the extension section
below). The Triton kernels in the top-level kernels/ folder are installed as the
subpackage ``dynexec.kernels`` so that no top-level package named ``kernels`` lands in
site-packages.

Extension build configuration (environment variables):
  DYNEXEC_CUDA=0|1            0: CPU-only extension. 1: build the CUDA kernels too and fail
                              if that is impossible. Unset: CUDA kernels when torch has
                              CUDA (torch.version.cuda) and nvcc is found (CUDA_HOME).
  DYNEXEC_NATIVE=0            build no native extension at all (pure-Python install).
  DYNEXEC_ONEDNN=0|1          0: no oneDNN convolutions. 1: require them. Unset: build them
                              when oneDNN is found (the onednn-cpu-gomp and
                              onednn-devel-cpu-gomp wheels install it into the environment).
  DYNEXEC_ONEDNN_ROOT         a oneDNN install (include/oneapi/dnnl/dnnl.hpp, lib/libdnnl.so)
                              to use instead of the environment's.
  DYNEXEC_CUDA_INCLUDE_DIRS   extra include folders (os.pathsep-separated) for CUDA builds,
                              e.g. the pip CUDA wheels' include/ holding cusparse.h.
  TORCH_CUDA_ARCH_LIST        GPU architectures, read by torch.utils.cpp_extension.
"""
import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _log(msg):
    print(f"[dynexec setup] {msg}", flush=True)


def _find_onednn():
    """(include_dir, lib_dir) of a oneDNN install, or None. The extension links its own
    libdnnl: torch links oneDNN statically and exports none of its symbols."""
    roots = [os.environ.get("DYNEXEC_ONEDNN_ROOT", ""), sys.prefix]
    for root in filter(None, roots):
        inc, lib = os.path.join(root, "include"), os.path.join(root, "lib")
        if os.path.exists(os.path.join(inc, "oneapi", "dnnl", "dnnl.hpp")) and \
                glob.glob(os.path.join(lib, "libdnnl.so*")):
            return inc, lib
    return None


def _native_build():
    """Returns (ext_modules, cmdclass, options) for the native extension."""
    if os.environ.get("DYNEXEC_NATIVE", "1").strip() == "0":
        _log("DYNEXEC_NATIVE=0: not building the native extension dynexec._C")
        return [], {}, {}
    try:
        import torch
        from torch.utils.cpp_extension import (
            CUDA_HOME,
            BuildExtension,
            CppExtension,
            CUDAExtension,
        )
    except ImportError as exc:  # e.g. an isolated build without torch
        _log(f"torch is not importable ({exc}): not building dynexec._C "
             "(use pip install --no-build-isolation)")
        return [], {}, {}

    want = os.environ.get("DYNEXEC_CUDA", "").strip()
    if want not in ("", "0", "1"):
        sys.exit(f"[dynexec setup] DYNEXEC_CUDA must be 0 or 1, got {want!r}")
    cuda_possible = bool(torch.version.cuda) and CUDA_HOME is not None
    why_not = []
    if not torch.version.cuda:
        why_not.append("torch was built without CUDA")
    if CUDA_HOME is None:
        why_not.append("nvcc/CUDA_HOME not found")
    if want == "1" and not cuda_possible:
        sys.exit("[dynexec setup] DYNEXEC_CUDA=1 but the CUDA extension cannot be built: "
                 + "; ".join(why_not))
    use_cuda = cuda_possible if want == "" else want == "1"

    rel = lambda pattern: sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))
    sources = ["csrc/dynexec.cpp"] + rel("csrc/ops/cpu/*.cpp")
    # (torch adds -DPy_LIMITED_API itself for py_limited_api extensions)
    # -fno-trapping-math / -fno-math-errno as torch itself is built: no FP-exception or
    # errno side effects to preserve, so loops with selects and math vectorise (gate_cpu).
    cxx_flags = ["-O3", "-fno-trapping-math", "-fno-math-errno"]
    link_flags = []
    # at::parallel_for is inline in ATen's headers: compile with the same OpenMP as torch.
    if torch.backends.openmp.is_available() and sys.platform != "darwin":
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    define_macros = []
    cuda_extra_include_dirs = []
    include_dirs = [os.path.join(ROOT, "csrc")]
    kwargs = {}
    if use_cuda:
        sources += rel("csrc/ops/cuda/*.cu")
        define_macros.append(("DYNEXEC_WITH_CUDA", None))
        extra_inc = os.environ.get("DYNEXEC_CUDA_INCLUDE_DIRS", "")
        cuda_extra_include_dirs = [p for p in extra_inc.split(os.pathsep) if p]
        nvcc_flags = ["-O3", "--expt-relaxed-constexpr"]
        extension = CUDAExtension
        kwargs["extra_compile_args"] = {"cxx": cxx_flags, "nvcc": nvcc_flags}
    else:
        extension = CppExtension
        kwargs["extra_compile_args"] = {"cxx": cxx_flags}

    want_onednn = os.environ.get("DYNEXEC_ONEDNN", "").strip()
    if want_onednn not in ("", "0", "1"):
        sys.exit(f"[dynexec setup] DYNEXEC_ONEDNN must be 0 or 1, got {want_onednn!r}")
    onednn = _find_onednn() if want_onednn != "0" and sys.platform.startswith("linux") else None
    if want_onednn == "1" and onednn is None:
        sys.exit("[dynexec setup] DYNEXEC_ONEDNN=1 but oneDNN was not found (pip install "
                 "onednn-cpu-gomp onednn-devel-cpu-gomp, or set DYNEXEC_ONEDNN_ROOT)")
    libraries, library_dirs = [], []
    if onednn is not None:
        sources += rel("csrc/convolution/*.cpp") + rel("csrc/executor/*.cpp")
        define_macros.append(("DYNEXEC_WITH_ONEDNN", None))
        include_dirs.append(onednn[0])
        libraries.append("dnnl")
        library_dirs.append(onednn[1])
        link_flags.append(f"-Wl,-rpath,{onednn[1]}")

    _log("native extension dynexec._C configuration:")
    _log(f"  torch {torch.__version__} (CUDA {torch.version.cuda}), CUDA_HOME={CUDA_HOME}")
    _log(f"  DYNEXEC_CUDA={want or '<unset>'} -> CUDA kernels: {'yes' if use_cuda else 'no'}"
         + ("" if use_cuda or not why_not else f" ({'; '.join(why_not)})"))
    _log(f"  oneDNN convolutions: {'yes, ' + onednn[1] if onednn else 'no'}")
    if use_cuda:
        _log(f"  TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '<torch default>')}")
    _log(f"  sources: {' '.join(sources)}")
    _log(f"  cxx flags: {' '.join(cxx_flags)}; link flags: {' '.join(link_flags) or '-'}")
    _log(f"  include dirs: {' '.join(include_dirs)}"
         + (f"; after torch's/CUDA's: {' '.join(cuda_extra_include_dirs)}"
            if cuda_extra_include_dirs else ""))

    ext = extension(
        name="dynexec._C",
        sources=sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        libraries=libraries,
        library_dirs=library_dirs,
        extra_link_args=link_flags,
        py_limited_api=True,
        **kwargs,
    )
    # Searched after torch's and the toolkit's own include dirs, so they only fill gaps
    # (e.g. cusparse.h) and never shadow the toolkit headers nvcc was shipped with.
    ext.include_dirs.extend(cuda_extra_include_dirs)
    cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=True)}
    options = {"bdist_wheel": {"py_limited_api": "cp39"}}
    return [ext], cmdclass, options


ext_modules, cmdclass, options = _native_build()

setup(
    name="dynexec",
    version="0.1.0",
    description="Inference engine for dynamic-depth residual networks (SkipNet, BlockDrop)",
    python_requires=">=3.10",
    packages=["dynexec", "dynexec.models", "dynexec.runtime", "dynexec.runtime.ops", "dynexec.tools",
              "dynexec.kernels"],
    package_dir={"dynexec.kernels": "kernels"},
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "triton": ["triton>=3.0"],
        # build-time: dynexec._C's own oneDNN convolutions (install before building)
        "onednn": ["onednn-cpu-gomp", "onednn-devel-cpu-gomp"],
        "test": ["pytest", "pytest-benchmark", "hypothesis"],
        "tools": ["tqdm", "matplotlib"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options=options,
)
