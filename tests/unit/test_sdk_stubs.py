"""The SDK stub (pyro_mcp/_sdk_methods.pyi) is what the registry generates, method by
method: the SDK parameters by their registry names, their types and defaults, the
docstring and the result TypedDict; Pyro and AsyncPyro have exactly those methods, with
those signatures, at run time; and the stub ships in the package."""

from __future__ import annotations

import ast
import asyncio
import dataclasses
import fnmatch
import inspect
import tomllib
from pathlib import Path

import pytest

from pyro_mcp import AsyncPyro, Pyro
from pyro_mcp.api import all_operations
from pyro_mcp.api import stubs as stubs_module
from pyro_mcp.api.registry import Surface
from pyro_mcp.api.result_shapes import result_type
from pyro_mcp.api.stubs import SDK_ALIASES, STUB_PATH, main, render_stub, sdk_signature

ROOT = Path(__file__).resolve().parents[2]


def test_the_committed_stub_is_what_the_registry_generates() -> None:
    assert STUB_PATH.read_text() == render_stub(), "the SDK stub is stale: run `make stubs`"


def test_check_fails_on_a_stale_stub_and_passes_once_it_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stub = tmp_path / "methods.pyi"
    stub.write_text(render_stub().replace("def run_in_vm", "def run_in_a_vm"))
    assert main(["--check", "--output", str(stub)]) == 1
    assert capsys.readouterr().err == f"{stub} is stale: run `make stubs`\n"
    assert main(["--output", str(stub)]) == 0
    assert main(["--check", "--output", str(stub)]) == 0
    assert stub.read_text() == render_stub()


def test_make_stubs_is_the_generator() -> None:
    makefile = (ROOT / "Makefile").read_text()
    target = makefile[makefile.index("\nstubs: ") + 1 :].split("\n\n")[0]
    assert target.splitlines()[1:] == ["\t$(PY) -m pyro_mcp.api.stubs"]


def _stub_classes() -> dict[str, dict[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    tree = ast.parse(STUB_PATH.read_text())
    return {
        node.name: {
            item.name: item
            for item in node.body
            if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef)
        }
        for node in tree.body
        if isinstance(node, ast.ClassDef)
    }


def test_every_stub_method_has_its_registry_parameters_docstring_and_result() -> None:
    classes = _stub_classes()
    assert set(classes) == {"Pyro", "AsyncPyro"}
    for name, methods in classes.items():
        assert sorted(methods) == sorted([*(op.sdk for op in all_operations()), *SDK_ALIASES])
        for alias, target in SDK_ALIASES.items():  # pyro-mcp 3.x's names: the same method
            assert ast.dump(methods[alias].args) == ast.dump(methods[target].args), alias
        for op in all_operations():
            method = methods[op.sdk]
            assert isinstance(method, ast.AsyncFunctionDef) == (name == "AsyncPyro")
            offered = op.params_on(Surface.SDK)
            assert [a.arg for a in method.args.args] == ["self", *(p.name for p in offered)]
            optional = [p for p in offered if not p.required]
            defaults = [ast.literal_eval(d) for d in method.args.defaults]
            assert defaults == [p.default for p in optional], op.name
            assert ast.get_docstring(method) == op.doc, op.name
            assert ast.unparse(method.returns) == result_type(op).__name__  # type: ignore[arg-type]


def test_stub_types_say_what_the_argument_checks_take() -> None:
    methods = _stub_classes()["Pyro"]

    def annotation(sdk: str, name: str) -> str:
        arg = next(a for a in methods[sdk].args.args if a.arg == name)
        return ast.unparse(arg.annotation)  # type: ignore[arg-type]

    assert annotation("exec_workspace", "command") == "str | list[str] | tuple[str, ...]"
    assert annotation("exec_workspace", "timeout_seconds") == "float"
    assert annotation("exec_workspace", "cwd") == "str | os.PathLike[str] | None"
    assert annotation("service_logs", "stream") == "Literal['stdout', 'stderr', 'both']"
    assert annotation("write_workspace_file", "mode") == "int | str"
    assert annotation("create_workspace", "secrets") == (
        "list[Mapping[str, str]] | tuple[Mapping[str, str], ...] | None"
    )
    assert annotation("update_workspace", "clear_name") == "bool"


def test_the_stub_names_parameters_as_the_registry_does_not_as_the_function() -> None:
    """A parameter whose public name differs from the Python one is written by its public
    name: regenerating picks a rename in the registry up."""
    op = next(op for op in all_operations() if op.name == "workspace_status")
    renamed = tuple(
        dataclasses.replace(p, name="workspace_id") if p.name == "workspace" else p
        for p in op.params
    )
    text = render_stub([dataclasses.replace(op, params=renamed)])
    assert "    def workspace_status(self, workspace_id: str) -> WorkspaceStatusResult:" in text
    assert "workspace: str" not in text
    assert list(inspect.signature(op.func).parameters)[1] == "workspace"  # the function's own


def test_a_default_no_literal_can_write_is_refused() -> None:
    with pytest.raises(TypeError, match=r"a default of nan cannot be written in a stub"):
        stubs_module._default(float("nan"))


def test_pyro_and_async_pyro_have_the_same_methods_with_the_stub_signatures() -> None:
    def public(cls: type) -> set[str]:
        return {name for name in vars(cls) if not name.startswith("_")}

    generated = {op.sdk for op in all_operations()} | set(SDK_ALIASES)
    assert public(Pyro) == generated | {"create_server"}  # pyro-mcp 3.x's, on Pyro only
    assert public(AsyncPyro) == generated
    for op in all_operations():
        sync, coroutine = getattr(Pyro, op.sdk), getattr(AsyncPyro, op.sdk)
        assert inspect.signature(sync) == inspect.signature(coroutine) == sdk_signature(op)
        assert inspect.iscoroutinefunction(coroutine) and not inspect.iscoroutinefunction(sync)
        assert sync.__doc__ == coroutine.__doc__ == op.doc
        assert coroutine.__qualname__ == f"AsyncPyro.{op.sdk}"


def test_a_bad_call_of_either_client_is_the_type_error_python_gives() -> None:
    with pytest.raises(TypeError, match="unexpected keyword argument 'bogus'"):
        Pyro().exec_workspace("ws", ["true"], bogus=1)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="unexpected keyword argument 'bogus'"):
        asyncio.run(AsyncPyro().exec_workspace("ws", ["true"], bogus=1))  # type: ignore[call-arg]
    with pytest.raises(AttributeError, match="AsyncPyro has no operation 'no_such'"):
        AsyncPyro().no_such  # type: ignore[attr-defined]  # noqa: B018


def test_the_stub_and_py_typed_ship_in_the_package() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["pyro_mcp"]
    package = ROOT / "src" / "pyro_mcp"
    for shipped in (STUB_PATH, package / "py.typed"):
        relative = str(shipped.relative_to(package))
        assert shipped.is_file() and any(fnmatch.fnmatch(relative, p) for p in patterns)
