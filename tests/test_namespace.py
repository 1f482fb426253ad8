"""One import namespace: the repository's folders pipeline/, workers/, jobs/ and cluster/ are imported as
maskpipe.pipeline, maskpipe.workers, ... and never under their bare names, which other PyPI projects use
(a second import under another name would also load every module twice, with two copies of each class)."""

import ast
import subprocess
import sys

from tests.conftest import ROOT

BARE = ("pipeline", "workers", "jobs", "cluster")


def test_no_source_file_imports_a_folder_by_its_bare_name():
    offenders = []
    for path in sorted(ROOT.glob("**/*.py")):
        if ".git" in path.parts or path.parts[len(ROOT.parts)] == "maskpipe":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names if n.split(".")[0] in BARE]
    assert not offenders


def test_every_module_imports_under_maskpipe_alone(tmp_path):
    # From a directory outside the repository, as an installed user would: every module of the package
    # imports, and no bare top-level `pipeline`, `workers`, ... module is loaded along the way.
    code = (
        "import importlib, pkgutil, sys, maskpipe\n"
        "mods = [m.name for m in pkgutil.walk_packages(maskpipe.__path__, 'maskpipe.')]\n"
        "for name in mods: importlib.import_module(name)\n"
        f"bare = sorted(m for m in sys.modules if m.split('.')[0] in {BARE!r})\n"
        "print(len(mods), bare)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    count, bare = out.stdout.split(" ", 1)
    assert int(count) > 30 and bare.strip() == "[]"
