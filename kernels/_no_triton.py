"""Stand-ins for triton where it is not installed (e.g. macOS), so the kernel files still import and
their *_ref functions run. @triton.jit and @triton.autotune return the function unchanged, and
tl.constexpr is only read as an annotation; kernels/__init__.py never sends a tensor to Triton then."""
import types


def _decorator(*args, **kwargs):
    if len(args) == 1 and callable(args[0]) and not kwargs:  # bare @triton.jit
        return args[0]
    return lambda fn: fn  # @triton.autotune(configs=..., key=...)


triton = types.SimpleNamespace(jit=_decorator, autotune=_decorator, Config=lambda *a, **k: None)
tl = types.SimpleNamespace(constexpr=None)
