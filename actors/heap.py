"""Giving a long-lived process's memory back.

A session actor hosts session after session (actors/session_ref.py). A
session's objects form reference cycles (the core and its children point at
each other), so they are freed only when Python's cycle collector gets to
them, which for long-lived objects can be never: measured, each ended
session left ~9 MB behind (silero's model and its buffers) and a reused
actor grew from 73 to 127 MB in 12 minutes of the soak. So an ended session
is collected at once, and the C heap's free pages go back to the OS.
"""

from __future__ import annotations

import gc


def trim_heap() -> None:
    """Return the C heap's free pages to the OS (glibc's `malloc_trim`;
    elsewhere a no-op): native libraries (ONNX, Opus) free memory that
    glibc would otherwise keep for good."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def release_memory() -> None:
    """Collect reference cycles now, then trim the heap."""
    gc.collect()
    trim_heap()
