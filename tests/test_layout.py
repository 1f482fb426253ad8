"""The tree shows the architecture: pipeline/ in folders by concern whose imports run one way, a stage
kind in one file (its config beside its body), and a README that draws the tree as it is."""

import ast
import re

from tests.conftest import ROOT

# Lowest first: a module may import its own folder and those before it (`pipeline/__init__.py` says so).
LAYERS = ["__init__", "core", "train", "eval", "nm", "attention", "io", "stages", "config", "run"]


def _layer(module: str) -> str | None:
    """`maskpipe.pipeline.nm.learn` -> `nm`; `maskpipe.pipeline.config` -> `config`; outside pipeline: None."""
    parts = module.split(".")
    if parts[:2] != ["maskpipe", "pipeline"]:
        return None
    return parts[2] if len(parts) > 2 else "__init__"


def _runtime_imports(tree: ast.Module):
    """Every absolute import, except those under `if TYPE_CHECKING:` (annotations only)."""
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING"
            for n in ast.walk(node)}
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if node.module == "maskpipe.pipeline" else node.module for a in node.names]
            yield node.lineno, names
        elif isinstance(node, ast.Import):
            yield node.lineno, [a.name for a in node.names]


def test_imports_between_pipeline_folders_run_one_way():
    offenders = []
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        rel = path.relative_to(ROOT / "pipeline")
        own = rel.parts[0].removesuffix(".py") if len(rel.parts) > 1 or rel.stem != "__init__" else "__init__"
        for lineno, names in _runtime_imports(ast.parse(path.read_text())):
            for name in names:
                theirs = _layer(name)
                if theirs in ("MaskpipeError", "__version__"):
                    theirs = "__init__"
                if theirs is not None and LAYERS.index(theirs) > LAYERS.index(own):
                    offenders.append(f"pipeline/{rel}:{lineno} ({own}) imports {name} ({theirs})")
    assert not offenders, "\n".join(offenders)


def test_pipeline_never_imports_ray():
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        for lineno, names in _runtime_imports(ast.parse(path.read_text())):
            assert not any(n.split(".")[0] == "ray" for n in names), f"{path}:{lineno}"


def test_every_stage_kind_defines_its_config_in_its_own_module():
    from maskpipe.pipeline.config import STAGE_CONFIGS, STAGE_KINDS
    from maskpipe.pipeline.stages import KINDS

    assert list(STAGE_KINDS) == list(KINDS) and list(STAGE_CONFIGS) == [k.config for k in KINDS.values()]
    for name, kind in KINDS.items():
        module = type(kind).__module__
        assert module == f"maskpipe.pipeline.stages.{name}", name
        assert kind.config.__module__ == module, f"{name}: config {kind.config.__qualname__} lives in {kind.config.__module__}"
        assert kind.config.model_fields["stage"].annotation.__args__ == (name,)
    files = {p.stem for p in (ROOT / "pipeline" / "stages").glob("*.py")} - {"__init__"}
    assert files == set(KINDS), "every file of pipeline/stages is one stage kind of the registry"


def test_readme_tree_matches_the_pipeline_folders():
    readme = (ROOT / "README.md").read_text()
    drawn = set(re.findall(r"^\s*(pipeline(?:/[a-z_]+)*)/\s", readme, re.M))
    real = {str(p.relative_to(ROOT)) for p in [ROOT / "pipeline", *(ROOT / "pipeline").rglob("*")]
            if p.is_dir() and p.name != "__pycache__"}
    assert drawn == real


def test_no_module_is_over_450_lines():
    long = [f"{p.relative_to(ROOT)}: {n}" for p in sorted(ROOT.rglob("*.py"))
            if ".git" not in p.parts and "maskpipe" != p.relative_to(ROOT).parts[0]
            and (n := len(p.read_text().splitlines())) > 450]
    assert not long, long
