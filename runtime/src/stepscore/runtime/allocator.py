"""The server process's memory allocator (`--allocator`), and the one owner of calls into the C library's malloc.

Why it matters: in 20-minute soaks of mixed traffic (docs/reliability.md, "The allocator") a server on glibc's
malloc grew +1.07 MB/min after warm-up, with jemalloc preloaded -0.24 MB/min at a ~25 MB lower level and as
many answers (-0.32 MB/min over 30 minutes on this module's default). The growth is fragmentation: memory the
server no longer holds but glibc cannot hand back. glibc with a fixed mmap threshold grew +0.38 MB/min;
capping its arenas (MALLOC_ARENA_MAX=2) did not help (+0.92 MB/min). jemalloc costs ~3% of throughput
(benchmarks/RESULTS.md, "The server's allocator").

So `stepscore serve` runs on jemalloc where it is installed (`--allocator auto`, the default). A process's
malloc is bound by the dynamic loader before Python starts, so the server re-executes itself once, at
start-up, with LD_PRELOAD naming jemalloc: the same PID, the same command line, one more interpreter start.
Without jemalloc it stays on glibc with a fixed mmap threshold. Only the server does this, to its own process:
a library must not change the allocator of the program that imports it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from stepscore.errors import ConfigError

CHOICES = ("auto", "jemalloc", "glibc")  # auto: jemalloc where it is installed, else glibc (tuned)
PRELOADED = "STEPSCORE_ALLOCATOR_PRELOADED"  # set on the re-executed process, so that it never re-executes again
M_MMAP_THRESHOLD = -3  # glibc's <malloc.h>
# Fixed: blocks this large are always mapped and unmapped. glibc's default starts here but rises to the
# largest block freed so far (up to 32 MiB), after which large batch buffers live in the heap and fragment it.
MMAP_THRESHOLD = 128 * 1024
INSTALL_HINT = "apt-get install libjemalloc2 (Debian, Ubuntu)"


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (it has mallopt and malloc_trim), else None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 - both must exist: musl and macOS lack malloc_trim
    except (OSError, AttributeError):
        return None
    return libc


def malloc_trim() -> Callable[[int], Any] | None:
    """glibc's malloc_trim (hands the free pages of every arena back to the system), or None without glibc."""
    libc = _glibc()
    return None if libc is None else libc.malloc_trim


def find_jemalloc() -> str | None:
    """jemalloc's shared library as the loader knows it ('libjemalloc.so.2'), or None where it is not installed."""
    return ctypes.util.find_library("jemalloc") if sys.platform == "linux" else None


def loaded(maps: Path = Path("/proc/self/maps")) -> str | None:
    """The malloc replacement mapped into this process ('jemalloc', 'tcmalloc'), or None: the C library's own."""
    try:
        text = maps.read_text()
    except OSError:  # not Linux
        return None
    for name in ("jemalloc", "tcmalloc"):
        if f"/lib{name}" in text:
            return name
    return None


def preload(choice: str, environ: Mapping[str, str], jemalloc: str | None, running: str | None) -> str | None:
    """The library to re-execute with in LD_PRELOAD, or None to stay as this process is.

    `choice`: one of CHOICES (ServerConfig checked it); `jemalloc`: find_jemalloc(); `running`: loaded().
    Refuses `--allocator jemalloc` where it cannot be had, before anything is loaded or opened.
    """
    if choice == "jemalloc" and running not in (None, "jemalloc"):
        raise ConfigError(f"--allocator jemalloc: {running} is already preloaded (LD_PRELOAD) in its place")
    if choice == "glibc" or running is not None:  # a malloc replacement is already in (LD_PRELOAD, or re-executed)
        return None
    if choice == "jemalloc" and environ.get(PRELOADED):
        raise ConfigError(f"--allocator jemalloc: {environ[PRELOADED]} was preloaded but the loader did not load it")
    if choice == "jemalloc" and jemalloc is None:
        raise ConfigError(f"--allocator jemalloc: jemalloc is not installed here ({INSTALL_HINT})")
    if environ.get(PRELOADED):  # auto, and the preload did not take: stay on glibc rather than loop
        return None
    return jemalloc


def preload_environ(environ: Mapping[str, str], library: str) -> dict[str, str]:
    """`environ` with `library` first in LD_PRELOAD (what was there stays after it) and the re-execution mark."""
    before = environ.get("LD_PRELOAD", "")
    return {**environ, "LD_PRELOAD": f"{library}:{before}" if before else library, PRELOADED: library}


def tune_glibc() -> bool:
    """Fix glibc's mmap threshold (MMAP_THRESHOLD); False where the C library is not glibc or refused it."""
    libc = _glibc()
    return libc is not None and libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1  # mallopt: 1 on success


def settle(choice: str, own_process: bool) -> str:
    """Put this server process on its allocator; returns what it runs on, in words, for the start-up line.

    Call it first, before the server starts a thread or opens a file. Where jemalloc is to be preloaded and
    `own_process` (the command line is this process's own, not a main() called from a program), it does not
    return: the process re-executes itself with jemalloc preloaded and comes back here, where it is loaded.
    """
    running = loaded()
    library = preload(choice, os.environ, find_jemalloc(), running)
    if library is not None:
        reason = "stepscore's main() was called from a program, whose process is not the server's to re-execute"
        if own_process and sys.executable:
            sys.stdout.flush()
            sys.stderr.flush()
            try:
                os.execve(sys.executable, sys.orig_argv, preload_environ(os.environ, library))
            except OSError as exc:  # the interpreter cannot be executed again: stay as it is
                reason = f"re-executing {sys.executable} failed: {exc}"
        if choice == "jemalloc":
            raise ConfigError(f"--allocator jemalloc: {reason}; preload it with LD_PRELOAD={library} instead")
    if running is not None:
        how = "preloaded by the server" if os.environ.get(PRELOADED) else "preloaded by the environment"
        return f"allocator {running} ({how})"
    if tune_glibc():
        return f"allocator glibc (mmap threshold {MMAP_THRESHOLD // 1024} KiB)"
    return "allocator: the C library's malloc"
