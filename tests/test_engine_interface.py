"""The seams of the codebase: one engine interface both backends implement, callers that use only
that interface, and no import cycles anywhere in ``src/``."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from eqakit.engine.base import InferenceEngine, Worker
from eqakit.engine.hf.engine import HFEngine
from eqakit.engine.hf.worker import EngineWorker
from eqakit.engine.vllm import VllmEngine, VllmWorker  # importable without vLLM installed

SRC = Path(__file__).resolve().parents[1] / "src"


def _modules() -> dict[str, Path]:
    modules = {}
    for path in (SRC / "eqakit").rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _runtime_imports(name: str, path: Path, known: set[str]) -> set[str]:
    """eqakit modules ``name`` imports when it runs (function-level imports included; imports under
    ``if TYPE_CHECKING:`` left out, since they never execute)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for statement in block.body
        for node in ast.walk(statement)
    }
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            module = (f"{base}.{node.module}" if node.module else base) if node.level else node.module or ""
            found |= {module} | {f"{module}.{alias.name}" for alias in node.names}
    return {m for m in found if m in known and m != name}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_in_src() -> None:
    modules = _modules()
    graph = {name: _runtime_imports(name, path, set(modules)) for name, path in modules.items()}
    assert graph["eqakit.engine.hf.engine"], "the walker must see imports"  # it is not vacuous
    assert _cycles(graph) == []


def test_the_walker_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_callers_name_the_interface_not_a_backend() -> None:
    """Predict, the API, the web UI and chat import eqakit.engine's interface, never a backend module."""
    modules = _modules()
    backend = ("eqakit.engine.hf", "eqakit.engine.vllm")
    offenders = {}
    for name, path in modules.items():
        if name.startswith("eqakit.engine"):
            continue
        used = _runtime_imports(name, path, set(modules))
        tree = ast.parse(path.read_text(encoding="utf-8"))
        used |= {
            node.module
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(backend)
        }
        bad = sorted(m for m in used if m.startswith(backend))
        if bad:
            offenders[name] = bad
    assert offenders == {}


def _members(protocol: type) -> dict[str, inspect.Signature | None]:
    """A Protocol's methods (with signatures) and data attributes (None)."""
    names = {n for n in (*vars(protocol), *protocol.__annotations__) if not n.startswith("_")}
    members: dict[str, inspect.Signature | None] = {}
    for name in sorted(names):
        value = vars(protocol).get(name)
        members[name] = inspect.signature(value) if callable(value) else None
    assert any(members.values()), "the protocol has methods"
    return members


@pytest.mark.parametrize(
    ("protocol", "implementation"),
    [
        (InferenceEngine, HFEngine),
        (InferenceEngine, VllmEngine),
        (Worker, EngineWorker),
        (Worker, VllmWorker),
    ],
    ids=["HFEngine", "VllmEngine", "EngineWorker", "VllmWorker"],
)
def test_backends_implement_the_protocols(protocol: type, implementation: type) -> None:
    """Every method of the interface exists on both backends and takes the same parameters (by
    name and kind); data attributes are checked on live instances (test_engine, test_vllm)."""
    for name, signature in _members(protocol).items():
        if signature is None:
            continue
        method = getattr(implementation, name, None)
        assert method is not None, f"{implementation.__name__} has no {name}"
        theirs = inspect.signature(method)
        want = [(p.name, p.kind) for p in signature.parameters.values()]
        have = [(p.name, p.kind) for p in theirs.parameters.values()]
        assert have == want, (
            f"{implementation.__name__}.{name}{theirs} differs from {protocol.__name__}.{name}{signature}"
        )


def test_a_live_engine_and_worker_are_instances(tiny_model_dir: Path) -> None:
    from eqakit.config import load_config
    from eqakit.engine import load_engine, make_worker

    engine = load_engine(
        load_config("infer", None, [f"model_name_or_path={tiny_model_dir}", "template=qwen3_vl_nothink"])
    )
    worker = make_worker(engine)
    assert isinstance(engine, InferenceEngine) and isinstance(worker, Worker)
    assert worker.start().close(timeout=10)


def test_close_stops_the_worker_and_shutdown_the_engine(tiny_model_dir: Path) -> None:
    """The same on both backends: a closed worker leaves its engine answering; after
    ``engine.shutdown()`` a request is refused (EngineUnavailable), by the engine and a new worker."""
    from eqakit.config import load_config
    from eqakit.engine import EngineUnavailable, Request, load_engine, make_worker

    engine = load_engine(
        load_config("infer", None, [f"model_name_or_path={tiny_model_dir}", "template=qwen3_vl_nothink"])
    )
    ask = Request([{"role": "user", "content": "Hi"}], engine.params(max_new_tokens=2, temperature=0))
    worker = make_worker(engine).start()
    assert worker.submit(ask).result(timeout=60).token_ids
    assert worker.close(timeout=10)
    assert engine.generate([ask])[0].token_ids  # the worker is gone, the engine is not
    engine.shutdown()
    engine.shutdown()  # idempotent
    with pytest.raises(EngineUnavailable):
        engine.generate([ask])
    with pytest.raises(EngineUnavailable):
        make_worker(engine).start().submit(ask)
