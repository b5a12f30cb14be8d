"""relora_ds as a user installs it (``pip install .``, a wheel, an sdist), not as this repository's editable install:
what setup.py declares against what the code imports, and what the built distributions hold. Oracles:
importlib.metadata's map of installed modules to the distributions that provide them, git's list of the
repository's files, and a fresh interpreter importing the wheel's own copy from outside the repository."""
import ast
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([*(ROOT / "relora_ds").rglob("*.py"), *(ROOT / "kernels").glob("*.py")])
OURS = {"relora_ds", "relora_kernels", "kernels"}
IMPORT_ERRORS = {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"}


def _setup_requirements() -> tuple[set[str], set[str]]:
    """(install_requires, every extra's requirements) of setup.py, as canonical distribution names."""
    call = next(node for node in ast.walk(ast.parse((ROOT / "setup.py").read_text()))
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup")
    kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords
              if k.arg in ("install_requires", "extras_require")}
    names = lambda reqs: {canonicalize_name(Requirement(r).name) for r in reqs}  # noqa: E731
    return names(kwargs["install_requires"]), names(r for reqs in kwargs["extras_require"].values() for r in reqs)


class _Imports(ast.NodeVisitor):
    """Top-level names of absolute imports, each with whether it runs when the module is imported (not inside a
    function) and whether a handler for ImportError surrounds it (the code carries on without the package)."""

    def __init__(self):
        self.found: list[tuple[str, bool, bool]] = []
        self._in_function = self._guarded = 0

    def _function(self, node):
        self._in_function += 1
        self.generic_visit(node)
        self._in_function -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_Try(self, node):
        caught = {getattr(h.type, "id", None) for h in node.handlers if h.type is not None}
        caught |= {getattr(e, "id", None) for h in node.handlers if isinstance(h.type, ast.Tuple) for e in h.type.elts}
        guarded = bool(caught & IMPORT_ERRORS) or any(h.type is None for h in node.handlers)
        self._guarded += guarded
        for stmt in node.body:
            self.visit(stmt)
        self._guarded -= guarded
        for stmt in [*node.handlers, *node.orelse, *node.finalbody]:
            self.visit(stmt)

    def _add(self, module: str):
        self.found.append((module.split(".")[0], not self._in_function, bool(self._guarded)))

    def visit_Import(self, node):
        for alias in node.names:
            self._add(alias.name)

    def visit_ImportFrom(self, node):
        if node.level == 0:
            self._add(node.module)


def _distributions(module: str, installed: dict[str, list[str]]) -> set[str]:
    """The distributions that provide ``module`` where installed (``installed``: packages_distributions()); else
    the distribution of the module's name (flash_attn: flash-attn), which a declaration of it names."""
    return {canonicalize_name(d) for d in installed.get(module, [])} or {canonicalize_name(module)}


def test_every_third_party_import_is_declared_in_setup_py():
    """An import at module level needs its distribution in install_requires; one inside a function, in
    install_requires or an extra, unless an ImportError handler carries on without it. A package reached only
    because a declared one depends on it today (pyarrow through datasets) breaks the day that one drops it."""
    required, extras = _setup_requirements()
    installed = metadata.packages_distributions()
    undeclared = []
    for path in SOURCES:
        visitor = _Imports()
        visitor.visit(ast.parse(path.read_text(), str(path)))
        for module, eager, guarded in visitor.found:
            if module in sys.stdlib_module_names or module in OURS or guarded:
                continue
            dists = _distributions(module, installed)
            allowed = required if eager else required | extras
            if not dists & allowed:
                where = "module level" if eager else "in a function"
                undeclared.append(f"{path.relative_to(ROOT)}: {module} ({where}; distribution {sorted(dists)})")
    assert not undeclared, "imported but not declared in setup.py:\n" + "\n".join(sorted(set(undeclared)))


@pytest.fixture(scope="module")
def source_tree(tmp_path_factory) -> tuple[Path, set[str]]:
    """A copy of the repository's files as a fresh clone has them (tracked, plus new files git does not
    ignore), built in: setuptools writes build/ and *.egg-info into the tree it builds."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout: git lists the repository's files")
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, text=True, check=True).stdout.split("\0")
    files = {f for f in listed if f and (ROOT / f).is_file()}  # (a tracked file deleted in the working tree: gone)
    tree = tmp_path_factory.mktemp("source") / "relora_ds"
    for f in files:
        (tree / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, tree / f)
    return tree, files


def _build(tree: Path, *args: str) -> None:
    proc = subprocess.run([sys.executable, *args], cwd=tree, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


def test_the_wheel_holds_the_two_packages_and_imports_outside_the_repository(source_tree, tmp_path):
    """The wheel holds relora_ds and relora_kernels (kernels/ renamed), every module of them and nothing else at
    top level (no tests, launch or kernels); unpacked and imported from another directory, every module imports
    from the wheel's copy, not from this checkout."""
    tree, files = source_tree
    _build(tree, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index", ".",
           "-w", str(tmp_path / "dist"))
    (wheel,) = (tmp_path / "dist").glob("relora_ds-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        z.extractall(tmp_path / "site")
    info = {n for n in names if n.split("/")[0].endswith(".dist-info")}
    expected = {f for f in files if f.startswith("relora_ds/") and f.endswith(".py")}
    expected |= {"relora_kernels/" + f.split("/", 1)[1] for f in files
                 if f.startswith("kernels/") and f.endswith(".py")}
    assert names - info == expected
    (top_level,) = (n for n in info if n.endswith("/top_level.txt"))
    assert (tmp_path / "site" / top_level).read_text().split() == ["relora_ds", "relora_kernels"]

    code = ("import importlib, pkgutil, relora_ds, relora_kernels\n"
            "mods = [m.name for p in (relora_ds, relora_kernels)\n"
            "        for m in pkgutil.walk_packages(p.__path__, p.__name__ + '.')]\n"
            "loaded = [importlib.import_module(m) for m in mods]\n"
            "dirs = {m.__file__.rsplit('/relora_', 1)[0] for m in [relora_ds, relora_kernels, *loaded]}\n"
            "print(len(loaded), sorted(dirs))")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site"),
           "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    count, dirs = proc.stdout.strip().splitlines()[-1].split(" ", 1)
    assert int(count) == len(expected) - 2 and dirs == repr([str(tmp_path / "site")])  # (less the two __init__.py)


def test_the_sdist_holds_the_repository(source_tree, tmp_path):
    """The source distribution is the repository as git has it: the README's commands (launch/, scripts/,
    ds_configs/) and the tests with their conftest, helpers and golden files, not setuptools' default of the
    packages and tests/test*.py alone."""
    tree, files = source_tree
    _build(tree, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist"))
    (sdist,) = (tmp_path / "dist").glob("relora_ds-*.tar.gz")
    with tarfile.open(sdist) as tar:
        shipped = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n and tar.getmember(n).isfile()}
    generated = {"PKG-INFO", "setup.cfg"} | {n for n in shipped if n.startswith("relora_ds.egg-info/")}
    missing, extra = files - shipped, shipped - generated - files
    assert not missing and not extra, f"the sdist lacks {sorted(missing)} and holds what git does not: {sorted(extra)}"
