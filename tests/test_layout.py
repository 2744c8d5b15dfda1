"""The repository's shape, checked: two real projects sharing one import namespace, no symlinks, typed
packages, no import cycles among stepscore's modules, and every repository path the docs name exists."""

from __future__ import annotations

import ast
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = (ROOT / "runtime" / "src", ROOT / "export" / "src")
SKIP_DIRS = {".venv", "node_modules", ".git", ".cache", "build", "dist", "__pycache__", ".mypy_cache", ".ruff_cache"}


def tracked_files() -> list[Path]:
    """Files git tracks; a tree walk (minus environments and caches) where the checkout is not a git one."""
    proc = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True)
    if proc.returncode == 0 and proc.stdout:
        return [ROOT / name for name in proc.stdout.decode().split("\0") if name]
    return [p for p in ROOT.rglob("*") if not SKIP_DIRS.intersection(p.relative_to(ROOT).parts)]


def modules() -> dict[str, Path]:
    """Every stepscore module of both projects -> its file (generated protobuf code excluded)."""
    found: dict[str, Path] = {}
    for src in SOURCES:
        for path in sorted(src.rglob("*.py")):
            if path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
                continue
            parts = path.relative_to(src).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            assert name not in found, f"{name} is defined twice: {found[name]} and {path}"
            found[name] = path
    return found


def test_no_symlinks_in_the_repository() -> None:
    links = [str(p.relative_to(ROOT)) for p in tracked_files() if p.is_symlink()]
    assert not links, f"symlinks are not allowed (a checkout without symlink support loses them): {links}"


def test_each_project_ships_typed_real_packages() -> None:
    assert (ROOT / "runtime/src/stepscore/py.typed").is_file()
    assert (ROOT / "export/src/stepscore/export/py.typed").is_file()
    # `stepscore` is a namespace shared by the two projects: neither may own it with an __init__.py
    for src in SOURCES:
        assert not (src / "stepscore" / "__init__.py").exists()
    # no copy of the package anywhere else in the tree (each module has exactly one import name)
    stray = [p for p in tracked_files() if p.suffix == ".py" and "stepscore" in p.relative_to(ROOT).parts[:1]]
    assert not stray, stray
    found = modules()
    assert "stepscore.runtime.engine" in found and "stepscore.export.pipeline" in found
    assert all(not name.startswith(("runtime.", "export.")) for name in found)


def _imports(name: str, path: Path, known: set[str]) -> Iterator[str]:
    """The stepscore modules `name` imports (at any depth, except under `if TYPE_CHECKING:`)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    typing_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for stmt in node.body
        for inner in ast.walk(stmt)
    }
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            # importing one's own ancestor package (its __init__) is not an edge of a cycle
            if target and target != name and not name.startswith(target + "."):
                yield target


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_among_stepscore_modules() -> None:
    found = modules()
    known = set(found)
    graph = {name: set(_imports(name, path, known)) for name, path in found.items()}
    assert sum(len(edges) for edges in graph.values()) > 100  # the walk really sees the imports
    assert _cycles(graph) == []


# A repository path as docs and comments write it: starts at a top-level folder, no spaces.
PATH = re.compile(r"(?<![\w./-])((?:runtime|export|protos|tests|benchmarks|docs|deploy|examples|\.ci)/[\w./-]*\w)")
DOC_SUFFIXES = {".md", ".py", ".proto", ".toml", ".js", ".yaml", ".yml", ".conf"}


def _named_paths() -> Iterator[tuple[Path, str]]:
    for path in tracked_files():
        if path.suffix not in DOC_SUFFIXES or path.name.endswith(("_pb2.py", "_pb2_grpc.py", "RESULTS.md")):
            continue
        for match in PATH.finditer(path.read_text(errors="replace")):
            yield path, match.group(1)


# written by the scripts that use them, never committed
GENERATED = ("benchmarks/.cache",)


def _exists(named: str) -> bool:
    # globs and placeholders (a {name} field) are patterns, not paths
    if any(ch in named for ch in "*{<") or named.startswith(GENERATED):
        return True
    return (ROOT / named).exists()


def test_every_repository_path_named_in_docs_and_comments_exists() -> None:
    seen = list(_named_paths())
    assert len(seen) > 20
    missing = sorted({f"{p.relative_to(ROOT)}: {named}" for p, named in seen if not _exists(named)})
    assert not missing, "\n".join(missing)


# A module as docs and comments name it: stepscore.runtime.engine, stepscore.export.graph.DecoderSpec, ...
# (file names such as stepscore.json and stepscore.proto are not modules)
MODULE = re.compile(r"(?<![\w./])(stepscore(?:\.\w+)+)(?!\.?\w)(?<!\.json)(?<!\.proto)")


def test_every_stepscore_module_named_in_docs_and_comments_exists() -> None:
    known = set(modules()) | {"stepscore", "stepscore.v1.stepscore_pb2", "stepscore.v1.stepscore_pb2_grpc"}
    seen = 0
    missing = set()
    for path in tracked_files():
        if path.suffix not in DOC_SUFFIXES or path.name.endswith(("_pb2.py", "_pb2_grpc.py", "RESULTS.md")):
            continue
        for match in MODULE.finditer(path.read_text(errors="replace")):
            name = match.group(1).rstrip(".")
            seen += 1
            # a module, or an attribute of one (stepscore.runtime.engine.SyncEngine); the proto package
            # `stepscore.v1.X` names messages and services
            if not any(name == m or name.startswith(m + ".") for m in known if m != "stepscore"):
                missing.add(f"{path.relative_to(ROOT)}: {name}")
    assert seen > 50
    assert not missing, "\n".join(sorted(missing))


@pytest.mark.parametrize(
    "pattern", ["docs/*.md", "*.md", "runtime/*.md", "export/*.md", "benchmarks/**/*.md", "deploy/**/*.md"]
)
def test_markdown_links_resolve(pattern: str) -> None:
    for doc in ROOT.glob(pattern):
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if "://" in target:
                continue
            assert (doc.parent / target).exists(), f"{doc.relative_to(ROOT)} links to missing {target}"
