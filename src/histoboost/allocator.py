"""glibc's allocator tuned at run time with `mallopt`: what the MALLOC_* variables would set at start-up, without
asking users to set them. Left alone where the user already chose (those variables, or another allocator
through LD_PRELOAD) and where libc is not glibc."""

from __future__ import annotations

import os

# glibc's mallopt parameters (malloc.h): what MALLOC_TRIM_THRESHOLD_, MALLOC_MMAP_THRESHOLD_ and MALLOC_MMAP_MAX_ set.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
USER_CHOICE_ENV = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_ARENA_MAX",
                   "LD_PRELOAD")


def mallopt(settings: dict[int, int]) -> str:
    """Apply `settings` (parameter -> value). Returns "set", "user's choice" or "not glibc"."""
    import ctypes
    import platform

    if any(os.environ.get(k) for k in USER_CHOICE_ENV):
        return "user's choice"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "not glibc"
    try:
        function = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return "not glibc"
    function.argtypes, function.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return "set" if all(function(parameter, value) == 1 for parameter, value in settings.items()) else "not glibc"
