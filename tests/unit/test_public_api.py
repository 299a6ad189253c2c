"""The names `pyro_mcp` exports are exactly the intended ones."""

from __future__ import annotations

import pyro_mcp


def test_exported_names_are_exactly_the_public_api() -> None:
    assert set(pyro_mcp.__all__) == {
        "BuildError",
        "Conflict",
        "HostToolMissing",
        "IntegrityError",
        "InvalidArgument",
        "InvalidState",
        "NotFound",
        "OutsideRoot",
        "Pyro",
        "PyroError",
        "RuntimeMissing",
        "ToolFailed",
        "TooLarge",
        "__version__",
    }
    for name in pyro_mcp.__all__:
        assert getattr(pyro_mcp, name) is not None


def test_every_error_is_a_pyro_error_with_its_own_code() -> None:
    errors = [
        getattr(pyro_mcp, name)
        for name in pyro_mcp.__all__
        if isinstance(getattr(pyro_mcp, name), type)
        and issubclass(getattr(pyro_mcp, name), Exception)
    ]
    codes = {cls.code for cls in errors if cls is not pyro_mcp.PyroError}
    assert all(issubclass(cls, pyro_mcp.PyroError) for cls in errors)
    assert len(codes) == len({cls for cls in errors if cls is not pyro_mcp.PyroError})
