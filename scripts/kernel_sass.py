"""Instructions per neuron-step of the Triton kernels' time loops, from their sm_90 code, without a GPU.

    python scripts/kernel_sass.py

Compiles the variants that training and bench launch for the benchmark networks to sm_90 cubins with
Triton's bundled ptxas, disassembles them with its nvdisasm and counts the SASS instructions of each
kernel's largest loop (the T loop of the fused input conv; for the unrolled LIF kernels the whole
kernel), per neuron and step, with registers and stack (spilled bytes) from cuobjdump. Counts, not
timings: what the README's instruction figures come from (run under the GPU machine's Triton for its).
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from snncompile.kernels import _triton as K
from snncompile.kernels.input_conv import conv_tile
from snncompile.kernels.lif import _NO_FMA, pool_block, recompute_block

TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
FLOATS = {"k_tau1", "v_th", "half_a", "inv_a"}


def _signature(fn, ptrs: dict) -> dict:
    params = inspect.signature(fn.fn).parameters
    return {a: ptrs.get(a) or ("constexpr" if a.isupper() else "fp32" if a in FLOATS else "i32") for a in params}


def _sass(fn, ptrs: dict, constants: dict, loop_only: bool) -> tuple[int, str]:
    """(SASS instructions, 'REG:n STACK:m') of one compiled variant: of its largest backward-branching
    loop with ``loop_only``, else of the whole kernel."""
    compiled = triton.compile(ASTSource(fn, _signature(fn, ptrs), constants), target=GPUTarget("cuda", 90, 32),
                              options=_NO_FMA)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        lines = subprocess.run([os.path.join(TOOLS, "nvdisasm"), "-c", f.name], capture_output=True,
                               text=True, check=True).stdout.splitlines()
        usage = subprocess.run([os.path.join(TOOLS, "cuobjdump"), "-res-usage", f.name], capture_output=True,
                               text=True, check=True).stdout
    insts = [i for i, line in enumerate(lines) if re.match(r"^\s+/\*[0-9a-f]+\*/", line)]
    lo, hi = insts[0], insts[-1]
    if loop_only:
        labels = {line.split(":")[0]: i for i, line in enumerate(lines) if re.match(r"^\.L_x_\d+:", line)}
        spans = [(i - labels[m.group(1)], labels[m.group(1)], i) for i in insts
                 if (m := re.search(r"BRA\s+`\((\.L_x_\d+)\)", lines[i])) and labels.get(m.group(1), i) < i]
        _, lo, hi = max(spans)
    return sum(lo <= i <= hi for i in insts), re.search(r"REG:\d+ STACK:\d+", usage).group(0)


def main() -> None:
    print(f"Triton {triton.__version__}, sm_90, FMA contraction off, 4 warps (128 threads)\n")
    print("| kernel | variant | instructions per neuron-step | registers, stack bytes |")
    print("|---|---|---|---|")
    # the fused input conv: T loop of one thread, over its share of the [C_BLOCK, P_BLOCK, K*K] tile
    for c_in, pool, positions, what in [(2, 2, 17 * 17, "bench-nmnist input layer, 2x2 pool"),
                                        (2, 1, 34 * 34, "2 channels, unpooled"),
                                        (3, 1, 32 * 32, "bench-cifar input layer, 3 channels")]:
        c_block, p_block = conv_tile(128, positions, pool)
        ptrs = {"x_ptr": "*fp32", "w_ptr": "*fp32", "b_ptr": "*fp32", "o_ptr": "*bf16", "u_ptr": "*bf16"}
        constants = dict(T=8, K=pool, C_IN=c_in, KH=3, KW=3, PAD_H=1, PAD_W=1, SAVE_U=False, STORE_O=True,
                         HAS_BIAS=True, C_BLOCK=c_block, P_BLOCK=p_block)
        count, usage = _sass(K.conv_lif_forward, ptrs, constants, loop_only=True)
        per_thread = c_block * p_block * pool * pool / 128
        tile = f"{c_block}x{p_block}x{pool * pool}"
        print(f"| conv_lif_forward | {what}, tile {tile} | {count / per_thread:.1f} | {usage} |")
    # the LIF backward kernels at T = 8, bf16 gradient: the membrane read (fp32 training; the recompute
    # before took a forward kernel of its own besides) against RECOMPUTE from bf16 currents (bf16 training)
    steps = 8
    for recompute in (False, True):
        saved = "*bf16" if recompute else "*fp32"
        ptrs = {"u_ptr": saved, "go_ptr": "*bf16", "gi_ptr": "*i16", "gb_ptr": "*fp32", "b_ptr": "*fp32"}
        block = recompute_block(steps) if recompute else 1024
        count, usage = _sass(K.lif_backward, ptrs, dict(T=steps, T_POW2=steps, GRAD_BF16=True, SUM_T=True,
                                                         RECOMPUTE=recompute, HAS_BIAS=recompute, BLOCK=block),
                             loop_only=False)
        print(f"| lif_backward | {'RECOMPUTE' if recompute else 'membrane read'}, block {block} | "
              f"{count / (block / 128) / steps:.1f} | {usage} |")
        ptrs = {**ptrs, "gp_ptr": "*bf16"}
        del ptrs["go_ptr"]
        for pool in (2, 4):
            block = recompute_block(steps, pool * pool) if recompute else pool_block(pool)
            count, usage = _sass(K.lif_pool_backward, ptrs,
                                 dict(T=steps, T_POW2=steps, K=pool, GRAD_BF16=True, CHANNELS_LAST=False, SUM_T=True,
                                      RECOMPUTE=recompute, HAS_BIAS=recompute, BLOCK=block), loop_only=False)
            print(f"| lif_pool_backward | {pool}x{pool}, {'RECOMPUTE' if recompute else 'membrane read'}, block "
                  f"{block} | {count / (block * pool * pool / 128) / steps:.1f} | {usage} |")


if __name__ == "__main__":
    main()
