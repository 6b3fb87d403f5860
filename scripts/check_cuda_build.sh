#!/usr/bin/env bash
# Builds the CUDA flavour of the native extension dynexec._C (no GPU needed) and checks
# that the kernels are in the binary for sm_80 and sm_90.
#
#   scripts/check_cuda_build.sh
#
# * A virtualenv with a CUDA build of torch is kept OUTSIDE the checkout in
#   ${DYNEXEC_CUDA_VENV:-$HOME/.cache/dynexec/cuda-venv} and created only when absent
#   (torch 2.14.1+cu130, ~5.5 GB, ~1 min from the local wheel cache).
# * CUDA_HOME is the toolkit the `nvcc` on PATH runs (a wrapper script is followed).
# * The build is out-of-tree (a temp dir), so the checkout's in-place CPU build stays.
# * cuobjdump (pip package nvidia-cuda-cuobjdump) lists the cubins and their kernels.
# Prints PASS/FAIL at the end; exit code 0 only on PASS.
set -euo pipefail

START=$SECONDS
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${DYNEXEC_CUDA_VENV:-$HOME/.cache/dynexec/cuda-venv}"
TORCH_SPEC="${DYNEXEC_CUDA_TORCH:-torch==2.14.1}"
ARCHS=(80 90)
KERNELS=(partition_kernel gather_kernel scatter_residual_relu_kernel downsample_b_kernel
         scatter_residual_relu_pool_kernel recurrent_gate_step_kernel relu_pool_inplace_kernel)

log() { echo "[check_cuda_build] $*"; }
fail() {
  echo "[check_cuda_build] FAIL: $*" >&2
  echo "check_cuda_build: FAIL ($((SECONDS - START)) s)"
  exit 1
}

# ---------------------------------------------------------------- 1. venv
if [[ ! -f "$VENV/.dynexec-ready" ]]; then
  log "creating $VENV with $TORCH_SPEC (CUDA build) ..."
  mkdir -p "$(dirname "$VENV")"
  [[ -x "$VENV/bin/python" ]] || python3 -m venv "$VENV" || fail "cannot create venv $VENV"
  "$VENV/bin/python" -m pip install -q "$TORCH_SPEC" numpy ninja setuptools pybind11 \
    || fail "pip install of $TORCH_SPEC into $VENV failed"
  touch "$VENV/.dynexec-ready"
else
  log "using cached venv $VENV"
fi
PY="$VENV/bin/python"
read -r TORCH_VER TORCH_CUDA SITE < <("$PY" -c \
  'import torch, site; print(torch.__version__, torch.version.cuda, site.getsitepackages()[0])')
[[ "$TORCH_CUDA" != "None" ]] || fail "torch $TORCH_VER in $VENV has no CUDA support"
log "torch $TORCH_VER (CUDA $TORCH_CUDA)"

# ---------------------------------------------------------------- 2. toolkit
NVCC_ON_PATH="$(command -v nvcc || true)"
[[ -n "$NVCC_ON_PATH" ]] || fail "nvcc is not on PATH"
NVCC_REAL="$(readlink -f "$NVCC_ON_PATH")"
# A wrapper script (e.g. `exec /usr/local/cuda-X.Y/bin/nvcc "$@"`): follow the first
# absolute path to a bin/nvcc it names.
if file -b "$NVCC_REAL" 2>/dev/null | grep -qi text || head -c 2 "$NVCC_REAL" | grep -q '#!'; then
  TARGET="$(grep -oE '/[^"'"'"' ]*/bin/nvcc' "$NVCC_REAL" | head -n 1 || true)"
  [[ -n "$TARGET" && -x "$TARGET" ]] || fail "cannot find the real nvcc in wrapper $NVCC_REAL"
  NVCC_REAL="$(readlink -f "$TARGET")"
fi
export CUDA_HOME="$(dirname "$(dirname "$NVCC_REAL")")"
NVCC_VER="$("$CUDA_HOME/bin/nvcc" --version | grep -oE 'release [0-9.]+' | cut -d' ' -f2)"
log "nvcc $NVCC_ON_PATH -> $NVCC_REAL; CUDA_HOME=$CUDA_HOME (CUDA $NVCC_VER)"

# cusparse.h & co. (needed by ATen/cuda/CUDAContext.h) ship with the pip CUDA wheels.
CUSPARSE_H="$(find "$SITE/nvidia" -path '*/include/cusparse.h' 2>/dev/null | head -n 1 || true)"
[[ -n "$CUSPARSE_H" || -f "$CUDA_HOME/include/cusparse.h" ]] || fail "cusparse.h not found in $SITE/nvidia or $CUDA_HOME/include"
export DYNEXEC_CUDA_INCLUDE_DIRS="${CUSPARSE_H:+$(dirname "$CUSPARSE_H")}"
log "extra CUDA include dir: ${DYNEXEC_CUDA_INCLUDE_DIRS:-<none needed>}"

# ---------------------------------------------------------------- 3. cuobjdump
# The toolkit here has no cuobjdump/nvdisasm; PyPI has them as nvidia-cuda-cuobjdump and
# nvidia-cuda-nvdisasm (cuobjdump -sass runs nvdisasm).
find_tool() {  # name
  command -v "$1" 2>/dev/null && return 0
  [[ -x "$CUDA_HOME/bin/$1" ]] && { echo "$CUDA_HOME/bin/$1"; return 0; }
  find "$SITE/nvidia" -type f -name "$1" -perm -u+x 2>/dev/null | head -n 1
}
for tool in cuobjdump nvdisasm; do
  if [[ -z "$(find_tool $tool || true)" ]]; then
    log "installing $tool (pip: nvidia-cuda-$tool) into $VENV ..."
    "$PY" -m pip install -q "nvidia-cuda-$tool==${TORCH_CUDA%%.*}.*" || log "pip install nvidia-cuda-$tool failed"
  fi
done
CUOBJDUMP="$(find_tool cuobjdump || true)"
NVDISASM="$(find_tool nvdisasm || true)"
[[ -n "$NVDISASM" ]] && export NVDISASM_PATH="$(dirname "$NVDISASM")"

# ---------------------------------------------------------------- 4. build
BUILD="$(mktemp -d "${TMPDIR:-/tmp}/dynexec-cuda-build.XXXXXX")"
trap 'rm -rf "$BUILD"' EXIT
export DYNEXEC_CUDA=1
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
log "building in $BUILD (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS) ..."
BUILD_START=$SECONDS
(
  cd "$ROOT"
  "$PY" setup.py -q build_ext --build-temp "$BUILD/temp" --build-lib "$BUILD/lib"
) >"$BUILD/build.log" 2>&1 || { tail -n 60 "$BUILD/build.log" >&2; fail "the CUDA build failed (log above)"; }
grep -E '^\[dynexec setup\]' "$BUILD/build.log" || true
NWARN="$(grep -c -iE 'warning' "$BUILD/build.log" || true)"
log "build finished in $((SECONDS - BUILD_START)) s (${NWARN} lines mentioning warnings)"
grep -iE 'warning' "$BUILD/build.log" | grep -E 'csrc/' | head -n 20 || true
SO="$(find "$BUILD/lib" -name '_C*.so' | head -n 1)"
[[ -n "$SO" ]] || fail "no _C*.so produced in $BUILD/lib"
log "built $(basename "$SO") ($(du -h "$SO" | cut -f1))"

# ---------------------------------------------------------------- 5. loads + registers
(cd "$BUILD" && PYTHONPATH="$BUILD/lib" "$PY" - "$TORCH_CUDA") <<'PYEOF' || fail "the built extension does not load or register its CUDA kernels"
import sys
import torch
import dynexec._C  # noqa: F401  (namespace package: only the built .so is on the path)
v = int(torch.ops.dynexec.cuda_version())
want = tuple(int(p) for p in sys.argv[1].split(".")[:2])
print(f"[check_cuda_build] torch.ops.dynexec.cuda_version() = {v}; torch.version.cuda = {sys.argv[1]}")
assert (v // 1000, (v % 1000) // 10) == want, "CUDA version mismatch"
OPS = ("partition", "gather_rows", "scatter_residual_relu_", "downsample_b",
       "scatter_residual_relu_pool_", "recurrent_gate_step", "relu_pool_")
for op in OPS:
    for key in ("CPU", "CUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"dynexec::{op}", key), (op, key)
print(f"[check_cuda_build] CPU and CUDA kernels registered for all {len(OPS)} ops")
# The CPU kernels of the CUDA build still work:
idx, count = torch.ops.dynexec.partition(torch.tensor([True, False, True]))
assert idx.tolist() == [0, 2, 1] and int(count) == 2
x = torch.randn(4, 3, 4, 4)
assert torch.equal(torch.ops.dynexec.gather_rows(x, idx, 2), x[[0, 2]])
PYEOF

# ---------------------------------------------------------------- 6. cubins per arch
STATUS=0
if [[ -n "$CUOBJDUMP" && -n "$NVDISASM" ]]; then
  log "disassembler: $CUOBJDUMP ($("$CUOBJDUMP" --version | tail -n 1)), nvdisasm in $NVDISASM_PATH"
  "$CUOBJDUMP" --list-elf "$SO" | sed 's/^/    /'
  for a in "${ARCHS[@]}"; do
    "$CUOBJDUMP" -sass -arch "sm_$a" "$SO" >"$BUILD/sass_sm_$a.txt" 2>&1 || true
    FUNCS="$(grep -E '^\s*Function : ' "$BUILD/sass_sm_$a.txt" | sed -E 's/^\s*Function : //' || true)"
    nfun="$(grep -c . <<<"$FUNCS" || true)"
    log "sm_$a: $nfun kernels disassembled"
    for k in "${KERNELS[@]}"; do
      n="$(grep -c "$k" <<<"$FUNCS" || true)"
      if [[ "$n" -gt 0 ]]; then
        log "  sm_$a $k: $n instantiation(s)"
      else
        log "  sm_$a $k: MISSING"; STATUS=1
      fi
    done
    # The 16-byte paths must really use 128-bit global loads/stores.
    n128="$(grep -cE '(LDG|STG)\.E\.128' "$BUILD/sass_sm_$a.txt" || true)"
    log "  sm_$a 128-bit global loads/stores (LDG/STG.E.128): $n128"
    [[ "$n128" -gt 0 ]] || { log "  sm_$a: no 128-bit vector accesses found"; STATUS=1; }
  done
elif [[ -n "$CUOBJDUMP" ]]; then
  log "nvdisasm unavailable: listing kernels per arch from cuobjdump -res-usage instead of SASS"
  "$CUOBJDUMP" --list-elf "$SO" | sed 's/^/    /'
  for a in "${ARCHS[@]}"; do
    FUNCS="$("$CUOBJDUMP" -res-usage -arch "sm_$a" "$SO" 2>/dev/null | grep -E '^\s*Function ' || true)"
    for k in "${KERNELS[@]}"; do
      n="$(grep -c "$k" <<<"$FUNCS" || true)"
      log "  sm_$a $k: $n instantiation(s)"; [[ "$n" -gt 0 ]] || STATUS=1
    done
  done
else
  # Fallback: no cuobjdump. List the ELF cubins embedded in the .nv_fatbin section.
  log "cuobjdump unavailable: falling back to scanning the .nv_fatbin section for ELF cubins"
  "$PY" - "$SO" "${ARCHS[@]}" <<'PYEOF' || STATUS=1
import re, subprocess, sys
so, archs = sys.argv[1], [int(a) for a in sys.argv[2:]]
data = open(so, "rb").read()
found = {}
for m in re.finditer(rb"\x7fELF\x02\x01\x01(\x33|\x41)", data):  # ELFOSABI_CUDA
    off = m.start()
    flags = int.from_bytes(data[off + 48:off + 52], "little")
    sm = flags & 0xFF if flags & 0xFF else (flags >> 8) & 0xFF
    found[sm] = found.get(sm, 0) + 1
print("[check_cuda_build] embedded CUDA ELF cubins by sm:", found)
sys.exit(0 if all(a in found for a in archs) else 1)
PYEOF
fi

ELAPSED=$((SECONDS - START))
if [[ $STATUS -eq 0 ]]; then
  echo "check_cuda_build: PASS (CUDA $NVCC_VER, sm_${ARCHS[*]}, all ${#KERNELS[@]} kernels present; ${ELAPSED} s)"
else
  echo "check_cuda_build: FAIL (kernels missing for some arch; ${ELAPSED} s)"
  exit 1
fi
