#!/usr/bin/env bash
# What a kernel's inner loops cost in instructions, read from its SASS (no
# GPU needed; docs/gpu.md uses it to count instructions per FMA where a
# kernel is bound by instruction issue rather than by bytes).
#
# Compiles kernels/NAME.cu for one architecture (ARCH, default sm_90) with
# the project's nvcc, disassembles it (cuobjdump and nvdisasm from PyPI,
# into .venv-sass: the 13.0 line has no wheels of them, 13.2's read 13.0's
# cubins) and prints, per kernel whose name matches FILTER (a grep -E
# pattern, default all), each innermost loop (a backward branch whose body
# holds no other): its address range, its instructions, how many are FP32
# FMAs/multiplies/adds, shared and global loads and stores, conversions
# and address arithmetic, and instructions per FP32 operation.
# Usage: scripts/sass-loops.sh kernels/NAME.cu [FILTER]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/venv.sh
source=${1:?usage: scripts/sass-loops.sh kernels/NAME.cu [FILTER]}
filter=${2:-.}
arch=${ARCH:-sm_90}
venv=.venv-sass
bin="$(ensure_venv "$venv")/nvidia/cu13/bin"
if [ ! -x "$bin/cuobjdump" ] || [ ! -x "$bin/nvdisasm" ]; then
  venv_install "$venv" "nvidia-cuda-cuobjdump==13.2.*" "nvidia-cuda-nvdisasm==13.2.*"
fi
nvcc="${NVCC:-$(scripts/install-nvcc.sh)/nvcc}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$nvcc" --cubin -O3 -std=c++17 -Ikernels -arch="$arch" -o "$work/k.cubin" "$source"
PATH="$bin:$PATH" cuobjdump -sass "$work/k.cubin" > "$work/k.sass"
python3 - "$work/k.sass" "$filter" <<'EOF'
import re, sys
from collections import Counter
sass, pattern = open(sys.argv[1]).read(), re.compile(sys.argv[2])
kernels = re.split(r"\n\s*Function : (\S+)", sass)[1:]
line = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")
def kind(op):
    base = op.split(".")[0]
    if base in ("FFMA", "FMUL", "FADD"): return "fp32"
    if base in ("LDS", "LDSM"): return "lds"
    if base == "STS": return "sts"
    if base in ("LDG", "LD", "LDL"): return "ldg/ldl"
    if base in ("STG", "ST", "STL"): return "stg/stl"
    if base in ("F2F", "I2F", "F2I", "PRMT", "SHF", "F2FP") or (base == "IMAD" and ".U32" in op): return "convert/shift"
    if base in ("IMAD", "IADD3", "LEA", "VIADD", "UIADD3", "IMAD.WIDE", "ULEA", "UIMAD"): return "address/int"
    if base in ("BRA", "ISETP", "PLOP3", "BSYNC", "BSSY", "WARPSYNC", "NOP"): return "control"
    return "other"
for name, body in zip(kernels[0::2], kernels[1::2]):
    if not pattern.search(name): continue
    ins = []
    for addr, text in line.findall(body):
        text = re.sub(r"^@!?U?P\w+\s+", "", text.strip())
        ins.append((int(addr, 16), text))
    index = {a: k for k, (a, _) in enumerate(ins)}
    loops = []
    for k, (a, text) in enumerate(ins):
        m = re.match(r"BRA(?:\.\S+)?\s+(?:!?U?P\d+,\s*)?(0x[0-9a-f]+)", text)
        if m and int(m.group(1), 16) < a and int(m.group(1), 16) in index:
            loops.append((index[int(m.group(1), 16)], k))
    inner = [l for l in loops if not any(o != l and l[0] <= o[0] and o[1] <= l[1] for o in loops)]
    print(f"{name}: {len(ins)} instructions, {len(inner)} innermost loops")
    for s, e in inner:
        ops = Counter(kind(t.split()[0]) for _, t in ins[s:e + 1])
        n, fp = e - s + 1, ops["fp32"]
        mix = ", ".join(f"{k} {v}" for k, v in sorted(ops.items(), key=lambda x: -x[1]))
        per = f"{n / fp:.1f} per FP32 op" if fp else "no FP32 op"
        print(f"  loop {ins[s][0]:#06x}-{ins[e][0]:#06x}: {n} instructions, {per} ({mix})")
EOF
