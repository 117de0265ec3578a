"""Two changes to Triton's interpreter that make the kernel tests faster and change no result.

Both apply only under `TRITON_INTERPRET=1`, and only where the interpreter's internals are the
ones they expect (another Triton is left as it is). `install` applies them; conftest calls it
before any kernel runs.
"""

from __future__ import annotations

import dataclasses
import os


def install() -> None:
    """Apply both changes (under `TRITON_INTERPRET=1`, where Triton is installed)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        from triton.runtime import interpreter
    except ImportError:  # no Triton: the kernel tests skip
        return
    patch_the_language_once_per_launch(interpreter)
    no_integer_overflow_checks(interpreter)


def patch_the_language_once_per_launch(interpreter) -> None:
    """Make Triton's interpreter patch `triton.language` once per kernel launch.

    A launch patches the builtins of the language modules its kernel's module sees (`tl`,
    `tl.core`) to their interpreted versions; every call of a nested `@triton.jit` function
    repeats that for the modules its own module sees (a scan of every member of `tl`,
    `tl.core`, `tl.math` and `tl.tensor`), though after the first call from a module the
    members it finds are patched already. That repeat is a quarter of a kernel test's time.
    Here a launch patches once per module whose functions it calls; the later calls from that
    module get an empty patch. Where the interpreter's internals differ (another Triton),
    nothing is changed.
    """
    patch = getattr(interpreter, "_patch_lang", None)
    scope_type = getattr(interpreter, "_LangPatchScope", None)
    executor = getattr(interpreter, "GridExecutor", None)
    if patch is None or scope_type is None or executor is None:
        return
    run_grid = executor.__call__
    patched: set[int] | None = None  # in a launch: the globals whose modules it has patched

    def once(fn):
        if patched is None:
            return patch(fn)
        if id(fn.__globals__) in patched:
            return scope_type()
        patched.add(id(fn.__globals__))
        return patch(fn)

    def run_grid_patching_once(self, *args, **kwargs):
        nonlocal patched
        patched = set()
        try:
            return run_grid(self, *args, **kwargs)
        finally:
            patched = None

    interpreter._patch_lang = once
    executor.__call__ = run_grid_patching_once


def no_integer_overflow_checks(interpreter) -> None:
    """Turn off the interpreter's check of every 32-bit integer add, subtract and multiply for
    overflow (each recomputed in int64 and asserted): a third of a kernel test's time, for a
    check that cannot fire here, where every tensor and offset is far below 2³¹ elements (a
    wrong index still shows in the results, which the tests compare with float64). Compiled
    kernels check overflow only in debug builds."""
    builder = getattr(interpreter, "interpreter_builder", None)
    options = getattr(builder, "options", None)
    if dataclasses.is_dataclass(options) and hasattr(options, "sanitize_overflow"):
        builder.options = dataclasses.replace(options, sanitize_overflow=False)
