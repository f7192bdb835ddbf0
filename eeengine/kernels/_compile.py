"""Ahead-of-time compilation of a Triton kernel for a CUDA GPU without one (the build checks
of the kernels' ``compile_ahead_of_time``)."""

from collections.abc import Collection, Mapping

import triton


def compile_for_gpu(
    kernel: triton.runtime.JITFunction,
    pointers: Mapping[str, str],
    constexprs: Mapping[str, object],
    floats: Collection[str],
    capability: int,
    warp_size: int,
) -> object:
    """Compile ``kernel`` for ``sm_<capability>``.

    Args:
        kernel: a compiled-mode ``@triton.jit`` function (not the interpreter's).
        pointers: the Triton type of each pointer argument, e.g. ``{"hidden_ptr": "*fp16"}``.
        constexprs: the value of each ``tl.constexpr`` argument.
        floats: the scalar arguments passed as fp32; every other scalar is i32.
        capability: the compute capability as one number, 90 for an H100.
        warp_size: threads per warp of the target.

    Returns:
        ``triton.compiler.CompiledKernel`` (``.asm["ptx"]``, ``.asm["cubin"]``).
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = pointers[name]
        else:
            signature[name] = "fp32" if name in floats else "i32"
    source = ASTSource(kernel, signature, dict(constexprs))
    return triton.compile(source, target=GPUTarget("cuda", capability, warp_size))
