"""Every Triton kernel compiles for a Hopper GPU (sm_90) on this CPU machine, with the specialisations a
real launch makes (ints equal to 1 become constants), so GPU-only compile errors show up without a GPU.

The test session runs kernels in the interpreter, so the compiles run in a child process without it:
`python tests/test_triton_compile.py` compiles everything and exits non-zero on the first failure.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def test_kernels_compile_for_hopper():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).resolve().parents[1])
    if done.returncode == 3:
        pytest.skip(done.stdout.strip())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("compiled") == 11


def main() -> None:
    """Compile each kernel in representative configurations for sm_90; print one line per kernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fxpress.kernels.triton_conv import _lowbit_conv2d_kernel
    from fxpress.kernels.triton_dequant import _dequant_kernel
    from fxpress.kernels.triton_gemv import _lowbit_gemv_kernel
    from fxpress.kernels.triton_matmul import _lowbit_matmul_kernel, _sum_splits_kernel

    ones = {"offset": 1, "group": 1, "split_k": 1, "stride_xk": 1, "stride_wn": 1, "stride_sn": 1}
    f16 = {"x_ptr": "*fp16", "w_ptr": "*i32", "s_ptr": "*fp16", "b_ptr": "*fp16", "y_ptr": "*fp16"}

    def build(fn, pointers: dict, constants: dict, **options) -> None:
        constants = {k: v for k, v in constants.items() if k in fn.arg_names}
        signature = {n: "constexpr" if n in constants else pointers.get(n, "i32") for n in fn.arg_names}
        try:
            kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constants),
                                    target=GPUTarget("cuda", 90, 32), options=options)
        except RuntimeError as exc:
            if "ptxas" in str(exc).lower():
                print(f"cannot compile for sm_90 here: {exc}")
                sys.exit(3)
            raise
        assert kernel.metadata.shared <= 227 * 1024, f"{fn.__name__}: {kernel.metadata.shared} B of shared memory"
        print("compiled", fn.__name__, {k: v for k, v in constants.items() if k.isupper()})

    for width, grouped, (bm, bn, bk) in [(2, False, (16, 64, 256)), (3, True, (128, 128, 64)),
                                         (5, False, (64, 64, 64)), (8, False, (128, 256, 64))]:
        build(_lowbit_matmul_kernel, {**f16, "y_ptr": "*fp32"},
              {**ones, "WIDTH": width, "GROUPED": grouped, "MAGIC": not grouped, "HAS_BIAS": True, "BLOCK_M": bm,
               "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "UPCAST": False, "DOT_PRECISION": "tf32"},
              num_warps=4, num_stages=3)
    build(_sum_splits_kernel, {"ws_ptr": "*fp32", "y_ptr": "*fp16"}, {"BLOCK": 1024}, num_warps=4)
    for width, size in [(2, 3), (5, 1)]:
        build(_lowbit_conv2d_kernel, f16,
              {**ones, "KH": size, "KW": size, "WIDTH": width, "GROUPED": False, "MAGIC": True, "HAS_BIAS": True,
               "BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8, "UPCAST": False, "DOT_PRECISION": "tf32",
               "conv_sh": 1, "conv_sw": 1, "dil_h": 1, "dil_w": 1}, num_warps=4, num_stages=3)
    build(_dequant_kernel, {"w_ptr": "*i32", "s_ptr": "*fp16", "out_ptr": "*fp16"},
          {**ones, "WIDTH": 12, "GROUPED": False, "BLOCK_K": 64, "BLOCK_N": 64}, num_warps=4)
    for width, rows, grouped in [(1, 1, False), (3, 2, False), (4, 4, True)]:
        build(_lowbit_gemv_kernel, f16, {**ones, "WIDTH": width, "GROUPED": grouped, "HAS_BIAS": False,
                                         "M_PAD": rows, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3)


if __name__ == "__main__":
    main()
