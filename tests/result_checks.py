"""Run an operation as the SDK does and check what it returns against its declared
result type (pyro_mcp.api.results) and that type's JSON schema; the result-shape tests
of tests/unit, tests/oci and tests/guest share it."""

from __future__ import annotations

import json
from typing import Any

import jsonschema

from pyro_mcp.api import Context, all_operations
from pyro_mcp.api.registry import Surface
from pyro_mcp.api.result_shapes import check_result, result_schema


class CheckedCalls:
    """``calls(ctx, "workspace_exec", wid, ["true"])``: positional arguments go to the
    operation's SDK parameters in order; ``called`` is every operation run so far."""

    def __init__(self) -> None:
        self.called: set[str] = set()
        self.operations = {op.name: op for op in all_operations()}

    def __call__(self, ctx: Context, name: str, /, *args: Any, **kwargs: Any) -> Any:
        op = self.operations[name]
        names = [param.name for param in op.params_on(Surface.SDK)]
        result = op.call(ctx, Surface.SDK, **dict(zip(names, args, strict=False)), **kwargs)
        self.check(name, result)
        return result

    def via_sdk(self, client: Any, name: str, /, *args: Any, **kwargs: Any) -> Any:
        """``client.<operation name's SDK method>(...)`` (a Pyro), its result checked."""
        result = getattr(client, self.operations[name].sdk)(*args, **kwargs)
        self.check(name, result)
        return result

    def check(self, name: str, result: Any) -> None:
        """``result`` (of operation ``name``, however it was run) is as declared."""
        op = self.operations[name]
        check_result(op, result)
        jsonschema.validate(json.loads(json.dumps(result)), result_schema(op))
        self.called.add(name)
