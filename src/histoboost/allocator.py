"""glibc's allocator tuned at run time with `mallopt`: what the MALLOC_* variables would set at start-up, without
asking users to set them. Left alone where the user already chose (those variables, or another allocator
through LD_PRELOAD) and where libc is not glibc."""

from __future__ import annotations

import os

# glibc's mallopt parameters (malloc.h): what MALLOC_TRIM_THRESHOLD_, MALLOC_MMAP_THRESHOLD_, MALLOC_MMAP_MAX_ and
# MALLOC_ARENA_MAX set.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -3, -4, -8
KEEP_FREED = {M_MMAP_MAX: 0, M_TRIM_THRESHOLD: 2**31 - 1}  # mallopt takes an int: 2 GiB is its largest threshold
# Worker processes run the network in a worker thread, not the main one. glibc gives such a thread an arena of its
# own, whose heaps go back to the OS after every batch whatever the trim threshold (measured, one EfficientNet-Lite0
# image at the paper preset: 20x the page faults and 2.1x the time of the main thread); one arena for all threads
# keeps freed memory there too. The same as variables, for worker processes histoboost spawns.
KEEP_FREED_IN_THREADS = {**KEEP_FREED, M_ARENA_MAX: 1}
KEEP_FREED_ENVIRONMENT = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1), "MALLOC_ARENA_MAX": "1"}
USER_CHOICE_ENV = (
    "MALLOC_MMAP_MAX_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_ARENA_MAX",
    "LD_PRELOAD",
)


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
