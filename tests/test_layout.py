"""The package's layout: no import circle between fastrank's modules (the kernels included, as
``fastrank.kernels``), counting imports inside functions too, and the tooling kept out of the top
level that users import."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _modules() -> dict[str, tuple[Path, list[str]]]:
    """Module name -> (file, package parts) for fastrank/ and kernels/ (installed as fastrank.kernels)."""
    modules = {}
    for path in sorted(ROOT.glob("fastrank/**/*.py")) + sorted(ROOT.glob("kernels/*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[0] == "kernels":
            parts = ["fastrank", *parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
            package = parts
        else:
            package = parts[:-1]
        modules[".".join(parts)] = (path, package)
    return modules


def import_graph() -> dict[str, set[str]]:
    """Module -> the fastrank modules it imports anywhere in its body (functions included)."""
    modules = _modules()
    graph = {}
    for name, (path, package) in modules.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
                source = ".".join(part for part in (base, node.module or "") if part)
                for alias in node.names:  # `from package import module` names the module
                    target = f"{source}.{alias.name}"
                    imported.add(target if target in modules else source)
            elif isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
        graph[name] = {target for target in imported if target in modules and target != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycle():
    graph = import_graph()
    assert "fastrank.bench.runner" in graph and "fastrank.kernels.chain" in graph, sorted(graph)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_sees_a_cycle():
    # the check itself: a planted two-module cycle and a lazy (function-level) import are found
    graph = import_graph()
    graph["fastrank.bench.cases"] = graph["fastrank.bench.cases"] | {"fastrank.bench.suites"}
    assert find_cycle(graph) is not None
    assert "fastrank.bench.chain" in import_graph()["fastrank.bench.suites"]


def test_tooling_lives_in_the_bench_subpackage():
    top_level = {path.stem for path in (ROOT / "fastrank").glob("*.py")}
    assert not top_level & {"bench", "bench_chain", "bench_rank", "paper", "cli"}, top_level
    graph = import_graph()
    library = [name for name in graph if not name.startswith("fastrank.bench")]
    for name in library:  # the library never imports its tooling
        assert not {t for t in graph[name] if t.startswith("fastrank.bench")}, (name, graph[name])
