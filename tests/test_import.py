"""How saefast imports: ``import saefast`` must work on a machine without a GPU (it may not import
triton, whose import can touch the CUDA driver; the Triton backend is imported on first use), and
no saefast module imports, even lazily, a module that imports it back."""
import ast
import subprocess
import sys
from pathlib import Path

import saefast


def test_import_saefast_does_not_import_triton():
    code = "import sys, saefast; assert 'triton' not in sys.modules, sorted(m for m in sys.modules if 'triton' in m)"
    subprocess.run([sys.executable, "-c", code], check=True)


def _import_graph():
    """{module: the saefast modules it imports anywhere in its source (function bodies too)}."""
    root = Path(saefast.__file__).parent
    modules = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                if target == "saefast.kernels" or target.startswith("saefast.kernels."):
                    continue  # kernels/ lies outside the tree and never imports saefast
                while target not in modules and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target in modules and target != name:
                    deps.add(target)
        graph[name] = deps
    return graph


def test_kernels_never_import_saefast():
    kernels = Path(saefast.__file__).parent.parent / "kernels"
    for path in kernels.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.startswith("saefast") for n in names), f"{path.name} imports saefast"


def test_no_import_cycles():
    graph = _import_graph()
    assert "saefast.io" in graph["saefast.sae.base"], "the graph must see the SAE's own imports"
    cycles = []
    for start in graph:
        stack = [(start, [start])]
        seen = set()
        while stack:
            node, path = stack.pop()
            for dep in graph[node]:
                if dep == start:
                    cycles.append(path + [start])
                elif dep not in seen:
                    seen.add(dep)
                    stack.append((dep, path + [dep]))
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles[:5])
