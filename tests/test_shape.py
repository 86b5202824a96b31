"""The code's shape, checked: one name per module, no import circles, no daemon reaching into another,
modules and functions of a readable size, and a wheel that installs and runs on its own.

The package folders sit at the top of the repository (`agent/`, `proto/`, ...) and install as
`standby.agent`, `standby.proto`, ... With the repository on sys.path (pytest and `python -m` from the
root put it there) a bare `import proto` would also work and load every module a second time, under a
second name: two `BadRequest` classes, and an `except` that no longer catches. So every import of our own
code is spelled `standby.<package>` or relative.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("admin", "agent", "mastertarget", "plumbing", "processserver", "proto", "vsphere")
DAEMONS = ("admin", "agent", "mastertarget", "processserver")  # may import proto/, plumbing/, vsphere/ only
COMMANDS = ("standby", "standby-agent", "standby-ps", "standby-mt")
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80

def _python_files() -> Iterator[Path]:
    for top in (*PACKAGES, "tests", "bench"):
        for p in sorted((REPO / top).rglob("*.py")):
            if "__pycache__" not in p.parts:
                yield p


def _module_name(path: Path) -> str:
    """standby.<pkg>.<module> for package code; the dotted path for tests and bench."""
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["standby", *parts] if parts[0] in PACKAGES else parts)


def _package_of(path: Path, name: str) -> str:
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def _imports(path: Path) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, relative ones resolved."""
    name = _module_name(path)
    package = _package_of(path, name)
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")
                up = up[: len(up) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}"


def _our_modules() -> dict[str, Path]:
    return {_module_name(p): p for p in _python_files() if p.relative_to(REPO).parts[0] in PACKAGES}


def _target(imported: str, modules: dict[str, Path]) -> str | None:
    """The module of ours an import names (`from x import name` may name a module or a member of x)."""
    while imported and imported not in modules:
        imported = imported.rpartition(".")[0]
    return imported or None


def _graph() -> dict[str, set[str]]:
    modules = _our_modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for m, path in modules.items():
        for _, imported in _imports(path):
            t = _target(imported, modules)
            # A package's __init__ importing its own modules is how it re-exports them, not a dependency back.
            if t is not None and t != m and not t.startswith(m + "."):
                graph[m].add(t)
    return graph


def _circles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, edges = work[-1]
            for w in edges:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    component = set()
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        component.add(w)
                        if w == v:
                            break
                    if len(component) > 1:
                        found.append(frozenset(component))
    return found


def test_every_import_of_our_code_names_it_standby_dot_package() -> None:
    bare = [
        f"{p.relative_to(REPO)}:{line}: import {imported}"
        for p in _python_files()
        for line, imported in _imports(p)
        if imported.split(".")[0] in PACKAGES
    ]
    assert not bare, "import these as standby.<package>:\n" + "\n".join(bare)


def test_no_import_circle_inside_any_package() -> None:
    circles = _circles(_graph())
    assert not circles, "import circles:\n" + "\n".join(" <-> ".join(sorted(c)) for c in circles)


def test_the_daemons_meet_only_in_proto_and_plumbing() -> None:
    def daemon(m: str) -> str | None:
        top = m.split(".")[1]
        return top if top in DAEMONS else None

    cross = {
        (m, t) for m, targets in _graph().items() for t in targets if daemon(m) and daemon(t) and daemon(m) != daemon(t)
    }
    assert not cross, "\n".join(f"{m} imports {t}" for m, t in sorted(cross))


def test_vsphere_is_a_library_that_imports_no_daemon() -> None:
    """vsphere/ is shared like proto/ and plumbing/: the configuration service calls it, it calls none of
    the daemons."""
    up = {
        (m, t) for m, targets in _graph().items() if m.startswith("standby.vsphere") for t in targets
        if t.split(".")[1] in DAEMONS
    }
    assert not up, "\n".join(f"{m} imports {t}" for m, t in sorted(up))


def test_no_module_is_longer_than_500_lines() -> None:
    long = {m for m, p in _our_modules().items() if len(p.read_text().splitlines()) > MAX_MODULE_LINES}
    assert not long, f"split these (over {MAX_MODULE_LINES} lines): {sorted(long)}"


def _functions(path: Path) -> Iterator[tuple[str, int, bool]]:
    """(qualified name, lines, marked as a hot loop) of every function in the file.

    A function may run longer only where splitting it would cost per-block work in a hot loop; it says so
    with a `# shape: hot loop` comment on its `def` line (and why, in its docstring)."""
    source = path.read_text()
    lines = source.splitlines()

    def walk(node: ast.AST, prefix: str) -> Iterator[tuple[str, int, bool]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                n = (child.end_lineno or child.lineno) - child.lineno + 1
                hot = "# shape: hot loop" in lines[child.lineno - 1]
                yield f"{prefix}{child.name}", n, hot
                yield from walk(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                yield from walk(child, f"{prefix}{child.name}.")

    yield from walk(ast.parse(source, str(path)), "")


def test_no_function_is_longer_than_80_lines() -> None:
    long = {
        f"{m}:{fn}"
        for m, p in _our_modules().items()
        for fn, n, hot in _functions(p)
        if n > MAX_FUNCTION_LINES and not hot
    }
    assert not long, f"split these (over {MAX_FUNCTION_LINES} lines): {sorted(long)}"


def test_the_shape_checks_see_what_they_look_for(tmp_path: Path) -> None:
    """The checks above would pass on an empty graph; here they are shown a circle, a bare import, a long
    function and a marked hot loop."""
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [frozenset("abc")]
    assert _circles({"a": {"b"}, "b": set()}) == []
    graph = _graph()
    assert "standby.proto.frames" in graph["standby.proto.messages"]
    assert len(graph) > 50
    probe = REPO / "tests" / "_shape_probe.py"
    try:
        probe.write_text("import proto.frames\nfrom agent import cli\nfrom standby.proto import frames\n")
        got = [imported for _, imported in _imports(probe)]
        assert got == ["proto.frames", "agent.cli", "standby.proto.frames"]
    finally:
        probe.unlink()
    body = "".join(f"    x = {i}\n" for i in range(MAX_FUNCTION_LINES))
    long_fn = tmp_path / "long.py"
    long_fn.write_text(f"def plain():\n{body}\n\ndef hot():  # shape: hot loop\n{body}")
    n = MAX_FUNCTION_LINES + 1
    assert sorted(_functions(long_fn)) == [("hot", n, True), ("plain", n, False)]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built from a copy of what git tracks, so the build neither sees stray files nor leaves build/ here."""
    src = tmp_path_factory.mktemp("tree")
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, check=True, capture_output=True).stdout
    for rel in filter(None, tracked.decode().split("\0")):
        if (REPO / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, src / rel)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(out), str(src)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    (whl,) = out.glob("standby-*.whl")
    return whl


def test_the_wheel_holds_the_packages_under_standby(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"standby"}
    for pkg in PACKAGES:
        assert f"standby/{pkg}/__init__.py" in names
    assert "standby/agent/tracker/tracefs.py" in names
    assert "standby/mastertarget/replicas/vmdk_sparse.py" in names
    assert not any(n.startswith("standby/tests/") for n in names)


def test_the_wheel_installs_into_a_fresh_venv_and_runs(wheel: Path, tmp_path: Path) -> None:
    """The dependencies come from this machine's site-packages (no network in tests); standby itself only
    from the wheel: the imports are checked to resolve inside the venv, from a directory outside the tree."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    subprocess.run(
        [str(py), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", str(wheel)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = (
        "import standby.agent, standby.proto.requests, standby.mastertarget.replicas.vmdk_sparse, sys\n"
        "print(standby.agent.__file__)\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {PACKAGES!r}))\n"
    )
    got = subprocess.run([str(py), "-c", probe], cwd=tmp_path, env=env, check=True, capture_output=True,
                         text=True, timeout=60).stdout.splitlines()
    assert got[0].startswith(str(venv)), got
    assert got[1] == "[]", f"modules loaded under a bare name: {got[1]}"
    for cmd in COMMANDS:
        r = subprocess.run([str(venv / "bin" / cmd), "--help"], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, (cmd, r.stderr)
        assert "usage:" in r.stdout, (cmd, r.stdout)


# A declared dependency's import name where it differs from its distribution name.
IMPORT_NAMES = {"tomli-w": "tomli_w", "pyvmomi": "pyVmomi", "prometheus-client": "prometheus_client"}


def test_every_declared_dependency_is_imported_by_our_code() -> None:
    """A dependency nobody imports is weight an operator installs for nothing (pyvmomi comes back with the
    vSphere work, in the one module that uses it)."""
    import re
    import tomllib

    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[<>=!~\[ ;]", d, maxsplit=1)[0].lower() for d in declared}
    imported = {
        imported.split(".")[0] for p in _our_modules().values() for _, imported in _imports(p)
    }
    unused = {n for n in names if IMPORT_NAMES.get(n, n) not in imported}
    assert not unused, f"declared in pyproject.toml but imported nowhere: {sorted(unused)}"


def test_pyvmomi_is_imported_in_one_module_only() -> None:
    """STYLE.md: every other module reaches vSphere's types through standby.vsphere.api."""
    users = sorted({
        m for m, p in _our_modules().items() for _, imported in _imports(p)
        if imported.split(".")[0] in ("pyVmomi", "pyVim")
    })
    assert users == ["standby.vsphere.api"], users
