"""Flush float32 denormals to zero on every thread that computes, while training or analysing on the CPU.

Why: once a run has memorized its training set, most entries of d(loss)/d(logits) are tiny (the softmax of a wrong
answer is ~1e-40), and a few percent to an eighth of them fall below float32's smallest normal number (1.18e-38).
x86 cores take a slow path for every denormal operand or result; on an Intel Xeon that made the backward matmuls
5-17x slower and a post-memorization step slower than the reference loop's (issue 11). With the CPU's
flush-to-zero (FTZ: denormal results become 0) and denormals-are-zero (DAZ: denormal inputs read as 0) modes on,
those values are 0 and the step runs at its early speed. Results change only there: every value that is flushed
lies below 1.18e-38 in magnitude, where float32 keeps no more than a few significant bits anyway.

The mode lives in each thread's MXCSR register, and ``torch.set_flush_denormal`` sets only the calling thread's.
torch's matmuls and parallel loops run on an OpenMP team (the calling thread plus GNU OpenMP workers that MKL and
oneDNN share), and workers that already exist keep their own mode, so setting the flag in the calling thread alone
left half of every parallel matmul slow. ``flush_denormals`` therefore also runs a callback on every thread of the
calling thread's OpenMP pool, through ``GOMP_parallel`` of the libgomp that torch loaded. Threads that libgomp
creates later (``torch.set_num_threads`` raised) start with a copy of the creating thread's mode, which is on.

Where that route does not exist (torch built on another thread pool, no libgomp in the process, a system without
/proc) only the calling thread is switched, and a debug log line says so; where the CPU has no such mode (not
x86) nothing is switched, again with a debug line. Neither is an error.
"""

import contextlib
import ctypes
import functools
import logging
import os
import threading
from collections.abc import Callable, Iterator

import torch

log = logging.getLogger(__name__)

_FLUSH = True
"""Private switch: False makes ``flush_denormals`` a no-op (tests and the benchmark compare both)."""

# Read through module names at run time, so the compiler cannot fold the products with its own mode.
_SMALLEST_NORMAL = 2.2250738585072014e-308  # float64's; the mode is one register for every SSE/AVX precision
_DENORMAL = 5e-324


def thread_mode() -> tuple[bool, bool]:
    """(FTZ, DAZ) of the calling thread. There is no getter for them, so they are read off two float products
    (x86-64 does Python's float arithmetic in SSE, under the thread's MXCSR): a product whose exact value is
    denormal comes out 0 under FTZ; a denormal operand reads as 0 under DAZ."""
    normal, denormal = _SMALLEST_NORMAL, _DENORMAL
    return normal * 0.5 == 0.0, denormal * 2.0 == 0.0


def _restore(mode: tuple[bool, bool]) -> None:
    if mode[0] != mode[1]:  # only a hand-set MXCSR gets here: torch's setter moves both bits together
        log.debug("a thread had FTZ=%s, DAZ=%s; torch can only set both, so it gets %s", *mode, all(mode))
    torch.set_flush_denormal(all(mode))


_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


@functools.cache
def _libgomp() -> ctypes.CDLL | None:
    """The GNU OpenMP runtime that runs torch's intra-op threads, as loaded in this process; None with a debug
    line saying why when there is none to reach."""
    if "ATen parallel backend: OpenMP" not in torch.__config__.parallel_info():
        log.debug("torch's CPU threads are not an OpenMP pool; flushing denormals in the calling thread only")
        return None
    paths = set()
    try:
        with open("/proc/self/maps") as maps:  # address, perms, offset, device, inode, then the file if any
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and os.path.basename(fields[5].strip()).startswith("libgomp"):
                    paths.add(fields[5].strip())
    except OSError:
        pass
    # torch's wheel ships its own libgomp; another one (a system copy loaded by some other library) has another pool.
    torch_dir = os.path.dirname(torch.__file__)
    own = sorted(p for p in paths if p.startswith(torch_dir)) or sorted(paths)
    if len(own) != 1:
        log.debug("found %s libgomp in this process (%s); flushing denormals in the calling thread only",
                  len(own) or "no", ", ".join(own) or "none loaded")
        return None
    try:
        lib = ctypes.CDLL(own[0])  # already loaded: this only looks it up
        parallel = lib.GOMP_parallel
    except (OSError, AttributeError) as err:
        log.debug("cannot call GOMP_parallel in %s (%s); flushing denormals in the calling thread only", own[0], err)
        return None
    parallel.argtypes = [_CALLBACK, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
    parallel.restype = None
    return lib


def _on_every_thread(fn: Callable[[], None], n_threads: int) -> bool:
    """Run ``fn`` once on each thread of the calling thread's OpenMP team of ``n_threads`` (the calling thread is
    one of them); False where there is no such team to reach. ``fn`` must not raise (ctypes would only print it)."""
    lib = _libgomp()
    if lib is None:
        return False
    callback = _CALLBACK(lambda _: fn())  # kept alive until GOMP_parallel returns, after every thread has run it
    lib.GOMP_parallel(callback, None, n_threads, 0)  # ctypes releases the GIL; each thread takes it in the callback
    return True


@functools.cache
def _supported() -> bool:
    """Whether this CPU has FTZ/DAZ at all (torch.set_flush_denormal reports it), leaving the caller's mode as is."""
    before = thread_mode()
    supported = torch.set_flush_denormal(True)
    if supported:
        _restore(before)
    else:
        log.debug("this CPU has no flush-to-zero mode that torch can set; denormals are left as they are")
    return supported


@contextlib.contextmanager
def flush_denormals(enabled: bool = True) -> Iterator[None]:
    """Within the block, float32/float64 values below the smallest normal number are computed as 0 on the calling
    thread and on every OpenMP worker torch uses from it; afterwards each thread has its own previous mode back.

    Enter it in the thread that runs the computation (the OpenMP pool belongs to that thread). Nesting is fine.
    Works as a decorator too. ``enabled=False`` (or this module's private ``_FLUSH = False``) does nothing."""
    if not (enabled and _FLUSH) or not _supported():
        yield
        return
    n_threads = torch.get_num_threads()
    previous: dict[int, tuple[bool, bool]] = {}
    caller = threading.get_ident()

    def switch_on() -> None:
        previous[threading.get_ident()] = thread_mode()
        torch.set_flush_denormal(True)

    # The pool first and the calling thread with it (it is thread 0 of the team): a worker that libgomp creates for
    # this call copies the caller's mode, so the caller's must still be its old one when the probe reads it.
    if not _on_every_thread(switch_on, n_threads):
        switch_on()
    try:
        yield
    finally:
        default = previous[caller]  # for threads created inside the block: they would otherwise have copied it

        def switch_back() -> None:
            _restore(previous.get(threading.get_ident(), default))

        # A team at least as large as before, so that no worker that was switched on stays on.
        if not _on_every_thread(switch_back, max(n_threads, torch.get_num_threads())):
            switch_back()
