"""The names `pyro_mcp` exports are exactly the intended ones: the SDK and the whole
exception tree, so that every error an operation documents can be caught by name."""

from __future__ import annotations

import re
import subprocess
import sys

import pyro_mcp
from pyro_mcp import errors
from pyro_mcp.api.registry import all_operations


def test_exported_names_are_exactly_the_public_api() -> None:
    assert set(pyro_mcp.__all__) == {
        "AgentUnavailable",
        "AsyncPyro",
        "BootTimeout",
        "BuildError",
        "Cancelled",
        "Conflict",
        "Expired",
        "GuestError",
        "HostToolMissing",
        "IntegrityError",
        "InvalidArgument",
        "InvalidState",
        "ModelServerError",
        "NetworkUnavailable",
        "NodeLost",
        "NotFound",
        "OperationTimeout",
        "OutsideRoot",
        "ProtocolViolation",
        "Pyro",
        "PyroError",
        "RegistryError",
        "RegistryUnreachable",
        "RuntimeMissing",
        "TooLarge",
        "ToolFailed",
        "VMError",
        "__version__",
        "create_server",
    }
    for name in pyro_mcp.__all__:
        assert getattr(pyro_mcp, name) is not None


def test_import_pyro_mcp_loads_no_client_until_one_is_asked_for() -> None:
    program = (
        "import sys, pyro_mcp\n"
        "print(sorted(m for m in ('pyro_mcp.sdk', 'pyro_mcp.api', 'anyio') if m in sys.modules))\n"
        "from pyro_mcp import AsyncPyro, Pyro\n"
        "from pyro_mcp import sdk\n"
        "print(Pyro is sdk.Pyro, AsyncPyro is sdk.AsyncPyro)\n"
    )
    ran = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True)
    assert (ran.returncode, ran.stdout, ran.stderr) == (0, "[]\nTrue True\n", "")


def _error_tree(base: type[errors.PyroError]) -> list[type[errors.PyroError]]:
    found = [base]
    for subclass in base.__subclasses__():
        found += _error_tree(subclass)
    return found


def test_every_error_of_the_tree_is_exported_as_itself() -> None:
    tree = [cls for cls in _error_tree(errors.PyroError) if cls.__module__ == errors.__name__]
    missing = [cls.__name__ for cls in tree if cls.__name__ not in pyro_mcp.__all__]
    assert missing == []
    assert all(getattr(pyro_mcp, cls.__name__) is cls for cls in tree)
    assert len(tree) == 25  # the tree drawn in errors.py's docstring


def test_every_error_is_a_pyro_error_with_its_own_code() -> None:
    exported = [getattr(pyro_mcp, name) for name in pyro_mcp.__all__]
    classes = [cls for cls in exported if isinstance(cls, type) and issubclass(cls, Exception)]
    assert all(issubclass(cls, pyro_mcp.PyroError) for cls in classes)
    codes = [cls.code for cls in classes]
    assert len(codes) == len(set(codes))


def _named_errors(doc: str) -> list[str]:
    """The class names in the ``Errors:`` part of an operation's docstring (to its end):
    capitalised words with a lowercase letter (``VMError``, not ``VM``)."""
    _, found, errors_part = doc.partition("Errors:")
    return re.findall(r"\b[A-Z][A-Za-z]*[a-z][A-Za-z]*\b", errors_part) if found else []


def test_every_error_an_operation_documents_is_importable_from_pyro_mcp() -> None:
    documented = {
        (operation.name, name)
        for operation in all_operations()
        for name in _named_errors(operation.doc)
    }
    not_importable = sorted(
        (op, name)
        for op, name in documented
        if not (
            isinstance(getattr(pyro_mcp, name, None), type)
            and issubclass(getattr(pyro_mcp, name), pyro_mcp.PyroError)
        )
    )
    assert not_importable == []
    # The docs do name errors (some outside the basic tree), so this check checks something.
    assert {"NotFound", "BootTimeout", "AgentUnavailable"} <= {name for _, name in documented}
