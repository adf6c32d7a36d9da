"""The architecture's rules, read from the source: which module may import what, and no cycles.

Dependencies point one way (routes -> flow -> parts -> stores): a part never imports the flow
or the app, the stores import no part, and only gateway/upstream/ talks httpx.
"""

from __future__ import annotations

import ast
from pathlib import Path

GATEWAY = Path(__file__).parents[2] / "gateway"


def _imports() -> dict[str, set[str]]:
    """module -> the modules it imports (gateway's own, and third-party roots)."""
    found: dict[str, set[str]] = {}
    for path in GATEWAY.rglob("*.py"):
        module = ".".join(path.relative_to(GATEWAY.parent).with_suffix("").parts)
        module = module.removesuffix(".__init__")
        names = found.setdefault(module, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
                if node.module == "gateway":  # from gateway import logs, metrics
                    names.update(f"gateway.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
    return found


IMPORTS = _imports()


def test_only_the_upstream_package_imports_httpx_and_aiohttp() -> None:
    users = {m for m, names in IMPORTS.items()
             if any(n.split(".")[0] in ("httpx", "aiohttp") for n in names)}
    assert users == {"gateway.upstream", "gateway.upstream.transport"}


def test_parts_and_stores_never_import_what_sits_above_them() -> None:
    above = {"gateway.app", "gateway.routes", "gateway.images.flow", "gateway.server",
             "gateway.cli"}
    for module, names in IMPORTS.items():
        if module.startswith(("gateway.images.", "gateway.admission", "gateway.quota",
                              "gateway.upstream", "gateway.keyadmin")) and \
                module != "gateway.images.flow":
            assert not names & above, (module, names & above)
        if module.startswith("gateway.quota"):
            assert not any(n.startswith(("gateway.images", "gateway.admission"))
                           for n in names), module


def test_no_import_cycles() -> None:
    ours = {m: {n for n in names if n in IMPORTS and n != "gateway"}
            for m, names in IMPORTS.items()}
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, " -> ".join((*path, module))
        if module in done:
            return
        for name in ours[module]:
            visit(name, (*path, module))
        done.add(module)

    for module in ours:
        visit(module, ())


def test_nothing_asks_which_admission_or_principal_it_holds() -> None:
    for path in GATEWAY.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "isinstance":
                text = ast.unparse(node)
                assert "Admission" not in text and "Principal" not in text, (path, text)


def test_the_data_flow_has_no_back_and_forth() -> None:
    """The body writer frames and judges nothing; the client's side (where error answers are
    written) and the relay know neither the rules nor admission."""
    judging = {"gateway.images.rules", "gateway.images.form"}  # (the catalog is data)
    assert not IMPORTS["gateway.images.outgoing"] & judging
    for module in ("gateway.images.client", "gateway.images.relay"):
        assert not IMPORTS[module] & (judging | {"gateway.admission"}), module
