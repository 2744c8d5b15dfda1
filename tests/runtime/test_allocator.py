"""stepscore.runtime.allocator: which malloc `stepscore serve` runs on, decided without starting a server (the live
server's side is in tests/runtime/service/test_logs.py), and glibc's tuning, checked in a fresh process."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from stepscore.errors import ConfigError
from stepscore.runtime import allocator
from stepscore.runtime.allocator import PRELOADED, preload, preload_environ

LIB = "libjemalloc.so.2"


def test_auto_preloads_jemalloc_where_it_is_installed_and_stays_on_glibc_where_not() -> None:
    assert preload("auto", {}, LIB, None) == LIB
    assert preload("auto", {}, None, None) is None


def test_nothing_is_preloaded_twice_or_over_a_replacement_already_in() -> None:
    assert preload("auto", {}, LIB, "jemalloc") is None  # the re-executed process, or LD_PRELOAD from outside
    assert preload("jemalloc", {}, LIB, "jemalloc") is None
    assert preload("auto", {}, LIB, "tcmalloc") is None  # the operator's own choice stands
    # the mark says this process was re-executed already: a preload the loader ignored must not loop
    assert preload("auto", {PRELOADED: LIB}, LIB, None) is None


def test_glibc_is_never_preloaded_over() -> None:
    assert preload("glibc", {}, LIB, None) is None


@pytest.mark.parametrize(
    ("choice", "environ", "jemalloc", "running", "message"),
    [
        ("jemalloc", {}, None, None, "jemalloc is not installed here (apt-get install libjemalloc2"),
        ("jemalloc", {PRELOADED: LIB}, LIB, None, f"{LIB} was preloaded but the loader did not load it"),
        ("jemalloc", {}, LIB, "tcmalloc", "tcmalloc is already preloaded (LD_PRELOAD) in its place"),
    ],
)
def test_what_cannot_be_had_is_refused(
    choice: str, environ: dict[str, str], jemalloc: str | None, running: str | None, message: str
) -> None:
    with pytest.raises(ConfigError) as err:
        preload(choice, environ, jemalloc, running)
    assert message in str(err.value)


def test_jemalloc_asked_for_where_the_process_is_not_the_servers_to_re_execute_is_refused() -> None:
    if allocator.loaded() is not None:
        pytest.skip(f"this process already runs on {allocator.loaded()} (LD_PRELOAD): nothing would be preloaded")
    with pytest.raises(ConfigError, match="--allocator jemalloc: ") as err:
        allocator.settle("jemalloc", own_process=False)  # refused before it changes anything in this process
    # installed or not, it says how to get there
    assert "preload it with LD_PRELOAD=" in str(err.value) or "apt-get install libjemalloc2" in str(err.value)


def test_the_preload_goes_first_and_keeps_what_the_environment_preloads() -> None:
    assert preload_environ({"PATH": "/bin"}, LIB) == {"PATH": "/bin", "LD_PRELOAD": LIB, PRELOADED: LIB}
    got = preload_environ({"LD_PRELOAD": "libfoo.so"}, LIB)
    assert got["LD_PRELOAD"] == f"{LIB}:libfoo.so"


def test_loaded_reads_the_process_map(tmp_path: Path) -> None:
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f10 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n")
    assert allocator.loaded(maps) is None
    maps.write_text(maps.read_text() + "7f20-7f30 r-xp 0 08:01 2 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2\n")
    assert allocator.loaded(maps) == "jemalloc"
    assert allocator.loaded(tmp_path / "absent") is None  # no /proc: the C library's own malloc


# A fresh process (a fixed threshold is for the whole process): frees a 1 MiB block, which raises glibc's dynamic
# mmap threshold to 1 MiB, then allocates 512 KiB and prints whether that block was mapped (mallinfo2's hblks).
PROBE = textwrap.dedent(
    """
    import ctypes, sys
    from stepscore.runtime import allocator

    class Info(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = Info
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    if sys.argv[1] == "tuned":
        assert allocator.tune_glibc()
    libc.free(libc.malloc(1 << 20))
    before = libc.mallinfo2().hblks
    block = libc.malloc(512 << 10)
    print(libc.mallinfo2().hblks - before)
    libc.free(block)
    """
)


def _mapped_after_a_large_free(mode: str) -> int:
    proc = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout)


def _has_mallinfo2() -> bool:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallinfo2  # noqa: B018
    except (OSError, AttributeError):
        return False
    return allocator.loaded() is None  # under a preloaded malloc glibc's counters say nothing


@pytest.mark.skipif(not _has_mallinfo2(), reason="needs glibc >= 2.33 (mallinfo2) as this process's malloc")
def test_glibc_tuned_keeps_mapping_large_blocks_after_a_larger_one_was_freed() -> None:
    assert _mapped_after_a_large_free("tuned") == 1
    assert _mapped_after_a_large_free("default") == 0  # the control: glibc's threshold rose to 1 MiB
