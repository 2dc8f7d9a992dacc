"""The shape of the package: imports run one way, and backend code lives in
`keras_diffusion/backend/`.

Each module's imports of other `keras_diffusion` modules, at the top and
inside functions alike, are read from its source. A cycle among them means
two rooms that each reach into the other, which the design forbids.
"""

import ast
from pathlib import Path

import keras_diffusion
from keras_diffusion import pipeline

PACKAGE = Path(keras_diffusion.__file__).resolve().parent


def _module_name(path):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph():
    """{module: set of keras_diffusion modules it imports}."""
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                # `from keras_diffusion import samplers` names a module too.
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            edges |= {t for t in targets if t in modules and t != name}
        # The package itself is not an edge: its __init__ imports by name, lazily.
        graph[name] = edges - {"keras_diffusion"}
    return graph


def find_cycle(graph):
    """One cycle as a list of modules, or None."""
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt, path + [nxt])
                if found:
                    return found
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_among_the_modules():
    graph = import_graph()
    assert {"keras_diffusion.model", "keras_diffusion.pipeline", "keras_diffusion.samplers",
            "keras_diffusion.applications", "keras_diffusion.export"} <= set(graph)
    assert "keras_diffusion.pipeline" in graph["keras_diffusion.applications"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_arrows_run_one_way():
    graph = import_graph()
    models = {"keras_diffusion.model", "keras_diffusion.training", "keras_diffusion.cli"}
    # The pipeline, the samplers and the schedule import no model and nothing above them.
    for low in ("pipeline", "samplers", "schedule", "applications", "export", "conditioning"):
        assert not graph[f"keras_diffusion.{low}"] & models, low
    assert not any("keras_diffusion.cli" in edges for edges in graph.values())
    assert graph["keras_diffusion.schedule"] <= {"keras_diffusion.checks"}


# Modules that import a framework for what it reads, whatever the backend:
# PyTorch checkpoints (pickles) through torch's weights-only loader.
FRAMEWORK_READERS = {"checkpoint_files.py": "import torch"}


def test_only_the_backend_folder_branches_on_the_backend():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if "backend" in path.relative_to(PACKAGE).parts:
            continue
        source = path.read_text()
        for name in ("tensorflow", "jax", "torch"):
            for needle in (f'== "{name}"', f'!= "{name}"', f"import {name}"):
                allowed = FRAMEWORK_READERS.get(path.relative_to(PACKAGE).as_posix())
                if needle in source.replace("import tensorflow as tf", "") and needle != allowed:
                    offenders.append(f"{path.relative_to(PACKAGE)}: {needle}")
    assert not offenders, offenders


def test_pipeline_works_on_the_protocol_not_a_class():
    source = Path(pipeline.__file__).read_text()
    assert "DiffusionModel" not in source.replace("`DiffusionModel.generate`", "")


def class_length(source, name):
    """Lines from a class's `class` line to its last, as `ast` reads them."""
    for node in ast.parse(source).body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return node.end_lineno - node.lineno + 1
    raise LookupError(f"no class {name}")


def test_class_length_counts_from_the_class_line_to_the_last():
    source = "x = 1\n\n@decorated\nclass A:\n    def f(self):\n        return 1\n\n    y = 2\n\nz = 3\n"
    assert class_length(source, "A") == 5


def test_diffusion_model_stays_small():
    """Labels, prompts and the text encoder live in `conditioning`, sampling
    in the pipeline: the model class stays under 350 lines, from its
    `class DiffusionModel` line to its last."""
    length = class_length((PACKAGE / "model.py").read_text(), "DiffusionModel")
    assert length < 350, f"DiffusionModel is {length} lines; move what is not the model's out."


def _top_level_names(path):
    """The names a module's source binds at its top level."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for target in targets for t in ast.walk(target) if isinstance(t, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
    return names


def test_the_benchmarks_import_only_names_that_exist():
    """A benchmark runs for minutes before it reaches its report; a name it
    imports from the package or from a sibling script must exist at once."""
    import importlib
    import importlib.util

    folder = PACKAGE.parent / "benchmarks"
    siblings = {path.stem: path for path in folder.glob("*.py")}
    assert {"throughput", "presets", "prompts"} <= set(siblings)
    missing = []
    for path in sorted(siblings.values()):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom) or node.level or not node.module:
                continue
            if node.module in siblings:
                known = _top_level_names(siblings[node.module])
                missing += [f"{path.name}: {node.module}.{a.name}" for a in node.names
                            if a.name not in known]
            elif node.module.split(".")[0] == "keras_diffusion":
                module = importlib.import_module(node.module)
                missing += [f"{path.name}: {node.module}.{a.name}" for a in node.names
                            if not hasattr(module, a.name)
                            and importlib.util.find_spec(f"{node.module}.{a.name}") is None]
    assert not missing, missing
