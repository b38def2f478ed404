#!/bin/bash
# Build meshllm's kernels (meshllm/model/kernels/qmm.c) for every instruction set this machine
# can run or emulate, check each SIMD path against the portable definitions (check.c), and
# print a hash of every op's output (hash.c): one numerics means one hash on every line.
#
#   bash scripts/kernels/cross_check.sh
#
# ARM is cross-built and run under qemu when present:
#   apt-get install gcc-aarch64-linux-gnu qemu-user
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
flags="-O3 -ffp-contract=off"
run() {  # name, compiler, runner, extra flags...
    local name=$1 cc=$2 runner=$3; shift 3
    "$cc" $flags "$@" "$here/check.c" -o "$out/check_$name" -lm
    "$cc" $flags "$@" "$here/hash.c" -o "$out/hash_$name" -lm
    $runner "$out/check_$name" | sed "s/^/$name: /"
    $runner "$out/hash_$name" | sed "s/^/$name hash: /"
}
if [ "$(uname -m)" = x86_64 ]; then
    run portable cc ""
    grep -qw avx2 /proc/cpuinfo && run avx2 cc "" -mavx2 -mfma -mf16c
    grep -qw avx_vnni /proc/cpuinfo && run avxvnni cc "" -mavx2 -mfma -mf16c -mavxvnni
    grep -qw avx512_vnni /proc/cpuinfo && run avx512vnni cc "" -mavx2 -mfma -mf16c -mavx512vnni -mavx512vl
else
    run native cc ""
fi
if command -v aarch64-linux-gnu-gcc > /dev/null && command -v qemu-aarch64 > /dev/null; then
    run neon aarch64-linux-gnu-gcc qemu-aarch64 -static -march=armv8-a
    run neon-dotprod aarch64-linux-gnu-gcc qemu-aarch64 -static -march=armv8.2-a+dotprod
else
    echo "ARM: skipped (apt-get install gcc-aarch64-linux-gnu qemu-user to cross-check it)"
fi
