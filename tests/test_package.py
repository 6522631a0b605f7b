"""emascope is one package: one import name, lazy top-level imports, a torch-free dashboard, no import
cycles, every module importable on its own (docs/design.md, "Packages and modules")."""

from __future__ import annotations

import ast
import importlib.metadata as md
import os
import pkgutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import emascope

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"emascope": ROOT / "agent", "emascope.dashboard": ROOT / "dashboard",
           "emascope.samples": ROOT / "sample_runs"}
SHIPPED_RUNS = ROOT / "sample_runs" / "runs"
CLEAN_ENV = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "OMP_NUM_THREADS": "1",
             "HOME": os.environ.get("HOME", "/tmp")}


def _run(code: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=CLEAN_ENV, capture_output=True, text=True,
                          timeout=timeout)


def all_modules() -> list[str]:
    """Every module of the package, from the installed package's own path (not the folder names)."""
    out = []
    for pkg in FOLDERS:
        mod = __import__(pkg, fromlist=["_"])
        out.append(pkg)
        for info in pkgutil.iter_modules(mod.__path__):
            if not info.ispkg:
                out.append(f"{pkg}.{info.name}")
    return sorted(out)


def test_the_distribution_installs_one_top_level_name():
    dist = md.distribution("emascope")
    assert (dist.read_text("top_level.txt") or "").split() == ["emascope"]
    names = set()
    for f in dist.files or []:
        first = f.parts[0]
        if first in ("..", "__pycache__") or first.endswith(".dist-info") or first.startswith("__editable__"):
            continue  # scripts, caches, metadata and setuptools' editable-install machinery
        names.add(first.removesuffix(".py"))
    finder = next((f for f in dist.files or [] if f.name.endswith("_finder.py")), None)
    if finder is not None:  # an editable install: the finder maps import names to the folders
        text = Path(dist.locate_file(finder)).read_text()
        mapping = ast.literal_eval(text.split("MAPPING: dict[str, str] = ", 1)[1].split("\n", 1)[0])
        names |= {k.split(".")[0] for k in mapping}
        assert {k: Path(v) for k, v in mapping.items()} == FOLDERS
    assert names == {"emascope"}
    ep = {e.name: e.value for e in dist.entry_points if e.group == "console_scripts"}
    assert ep == {"emascope": "emascope.cli:main"}


def test_emascope_imports_from_a_folder_with_its_own_agent_and_dashboard(tmp_path):
    (tmp_path / "agent.py").write_text("MINE = 'agent'\n")
    (tmp_path / "dashboard.py").write_text("MINE = 'dashboard'\n")
    (tmp_path / "sample_runs.py").write_text("MINE = 'sample_runs'\n")
    code = ("import agent, dashboard, sample_runs\n"
            "from emascope import attach, EMABank\n"
            "import emascope.dashboard.data, emascope.samples.tree2d\n"
            "assert (agent.MINE, dashboard.MINE, sample_runs.MINE) == ('agent', 'dashboard', 'sample_runs')\n"
            "assert attach.__module__ == 'emascope.scope' and EMABank.__module__ == 'emascope.bank'\n"
            "print('ok')\n")
    out = _run(code, tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_folder_names_are_not_importable_from_elsewhere(tmp_path):
    out = _run("import importlib.util as u; print([n for n in ('agent', 'dashboard', 'sample_runs') "
               "if u.find_spec(n) is not None])", tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_import_emascope_is_lazy_and_torch_free(tmp_path):
    code = ("import sys; import emascope, emascope.runformat, emascope.atomic, emascope.config, emascope.version;"
            "print(sorted(m for m in ('torch', 'numpy', 'pandas', 'streamlit') if m in sys.modules))")
    out = _run(code, tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
    code = ("import sys; import emascope.profiles, emascope.synthesis, emascope.decay_search;"
            "print('torch' in sys.modules)")
    out = _run(code, tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stdout + out.stderr
    assert set(emascope.__all__) >= {"attach", "Scope", "EMABank", "DEFAULT_DECAYS", "BEMAConfig",
                                     "save_snapshot", "load_snapshot", "export_checkpoint", "__version__"}
    for name in emascope.__all__:
        assert getattr(emascope, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        emascope.nope  # noqa: B018


def test_dashboard_data_imports_with_torch_blocked(tmp_path):
    out = _run("import sys; sys.modules['torch'] = None; import emascope.dashboard.data; print('ok')", tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_dashboard_renders_a_shipped_run_with_torch_blocked(tmp_path):
    """Every dashboard module imports, and the app renders the shipped runs, with torch unimportable."""
    app = FOLDERS["emascope.dashboard"] / "app.py"
    code = f"""
import os, sys
sys.modules['torch'] = None
import emascope.dashboard.data, emascope.dashboard.exporting, emascope.dashboard.launch
import emascope.dashboard.plots, emascope.dashboard.ranking, emascope.dashboard.watch
import emascope.dashboard.files, emascope.dashboard.server
emascope.dashboard.server.install()  # the server's hooks, too, without torch
from streamlit.testing.v1 import AppTest
os.environ['EMASCOPE_DASHBOARD_PATH'] = {str(SHIPPED_RUNS)!r}
at = AppTest.from_file({str(app)!r}, default_timeout=120).run()
assert not at.exception, [e.value for e in at.exception]
assert not at.error, [e.value for e in at.error]
titles = [t.value for t in at.title]
at.selectbox(key='run').set_value({str(SHIPPED_RUNS / 'digits')!r}).run()
assert not at.exception and not at.error
titles += [t.value for t in at.title]
assert 'torch' not in sys.modules or sys.modules['torch'] is None
print(sorted(set(titles)))
"""
    out = _run(code, tmp_path, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "tree2d" in out.stdout and "digits" in out.stdout


def test_every_module_imports_alone_in_a_fresh_interpreter(tmp_path):
    modules = all_modules()
    assert len(modules) > 20 and "emascope.dashboard.app" in modules

    def one(name: str) -> tuple[str, int, str]:
        if name == "emascope.dashboard.app":  # a Streamlit script: importing it renders the page
            code = "import ast, sys; import emascope.dashboard as d, pathlib; " \
                   "compile(pathlib.Path(d.__path__[0], 'app.py').read_text(), 'app.py', 'exec')"
        else:
            code = f"import {name}"
        out = _run(code, tmp_path)
        return name, out.returncode, out.stderr[-2000:]

    with ThreadPoolExecutor(max_workers=2) as pool:
        failed = [r for r in pool.map(one, modules) if r[1] != 0]
    assert not failed, failed


def _imports_of(path: Path, module: str) -> set[str]:
    """emascope modules that ``module`` (the file at ``path``) imports, anywhere in the file."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m == "emascope" or m.startswith("emascope.")}


def import_graph() -> dict[str, set[str]]:
    modules = set(all_modules())
    graph = {}
    for name in modules:
        pkg, _, leaf = name.rpartition(".")
        if name in FOLDERS:
            path = FOLDERS[name] / "__init__.py"
        else:
            path = FOLDERS[pkg] / f"{leaf}.py"
        graph[name] = {m for m in _imports_of(path, name) if m in modules and m != name}
    return graph


def test_no_module_imports_one_that_imports_it():
    graph = import_graph()
    # the package __init__ only maps names lazily: leave it out of the cycle check
    graph = {k: {m for m in v if m != "emascope"} for k, v in graph.items() if k != "emascope"}
    pairs = sorted((a, b) for a in graph for b in graph[a] if a in graph.get(b, ()))
    assert not pairs, pairs
    # and no longer cycle either
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                pytest.fail(f"import cycle: {' -> '.join(path + [node, nxt])}")
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])


def test_the_core_imports_neither_the_dashboard_nor_the_samples():
    graph = import_graph()
    for name, deps in graph.items():
        if name.startswith(("emascope.dashboard", "emascope.samples")) or name in ("emascope", "emascope.cli"):
            continue
        bad = sorted(d for d in deps if d.startswith(("emascope.dashboard", "emascope.samples")))
        assert not bad, (name, bad)
    # the dashboard reaches the core only through its torch-free modules (synthesis/profiles: the
    # error report of post-hoc synthesis is pure numpy, computed before an export)
    allowed = {"emascope", "emascope.runformat", "emascope.atomic", "emascope.procs", "emascope.version",
               "emascope.synthesis", "emascope.profiles"}
    for name, deps in graph.items():
        if name.startswith("emascope.dashboard"):
            core = {d for d in deps if not d.startswith("emascope.dashboard")}
            assert core <= allowed, (name, core - allowed)


def _code_strings(path: Path) -> list[str]:
    """String constants of a module's code (docstrings left out: they may name files)."""
    tree = ast.parse(path.read_text(), str(path))
    docs = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docs.add(id(first.value))
    return [n.value for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs]


def test_no_product_module_spells_a_run_directory_path():
    """Run-directory names come from emascope.runformat only (the module shared by writer and reader)."""
    spelled = ("run.json", "metrics.jsonl", "events.jsonl", "heartbeat", "latest.safetensors", "banks",
               "requests", "exports", "reference.npy", "step_", ".status.json")
    offenders = []
    for folder in FOLDERS.values():
        for path in folder.glob("*.py"):
            if path.name == "runformat.py":
                continue
            for text in _code_strings(path):
                if " " in text:
                    continue  # a message for people, not a path
                parts = text.split("/")
                if any(part == s or (s.startswith((".", "step_")) and s in part) for part in parts for s in spelled):
                    offenders.append(f"{path.relative_to(ROOT)}: {text!r}")
    assert not offenders, offenders
