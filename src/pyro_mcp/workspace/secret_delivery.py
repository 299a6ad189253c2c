"""A workspace's secrets between the store and its guest.

Sealed in the store (:mod:`vault`), opened in memory only to be handed to the guest
agent at every boot (``secrets_put``: the guest keeps them in a tmpfs, never on a disk)
and to redact what the guest sends back (:class:`~pyro_mcp.guest.redaction.Redactor`).
"""

from __future__ import annotations

import json
from collections.abc import Collection
from typing import TYPE_CHECKING

from pyro_mcp.errors import InvalidArgument

if TYPE_CHECKING:
    from pyro_mcp.guest.client import AgentClient
    from pyro_mcp.guest.redaction import Redactor
    from pyro_mcp.workspace.secret_input import SecretInput
    from pyro_mcp.workspace.store import WorkspaceStore
    from pyro_mcp.workspace.vault import Vault

DELIVERY_TIMEOUT_S = 30.0


def store_secrets(
    store: WorkspaceStore, vault: Vault, workspace_id: str, secrets: list[SecretInput]
) -> None:
    """Seal ``secrets`` and record them (names in the clear) with the workspace."""
    if not secrets:
        return
    sealed = {s.name: (s.source_kind, vault.seal(workspace_id, s.name, s.value)) for s in secrets}
    store.add_secrets(workspace_id, sealed)


def open_secrets(store: WorkspaceStore, vault: Vault, workspace_id: str) -> dict[str, str]:
    """The workspace's secret values by name (in memory only)."""
    return {s.name: vault.open(workspace_id, s.name, s.sealed) for s in store.secrets(workspace_id)}


def deliver(store: WorkspaceStore, vault: Vault, workspace_id: str, client: AgentClient) -> None:
    """Hand the guest of a fresh boot its secrets (it keeps them in tmpfs); from now on
    the client redacts them in what the guest sends back."""
    from pyro_mcp.guest.redaction import Redactor

    values = open_secrets(store, vault, workspace_id)
    if not values:
        return
    client.redactor = Redactor(values.values())
    client.call(
        "secrets_put",
        {"names": sorted(values)},
        json.dumps(values).encode("utf-8"),
        timeout_s=DELIVERY_TIMEOUT_S,
    )


def redactor(store: WorkspaceStore, vault: Vault, workspace_id: str) -> Redactor | None:
    """The redactor of a workspace with secrets; None for one without."""
    if not store.secrets(workspace_id):
        return None
    from pyro_mcp.guest.redaction import Redactor

    return Redactor(open_secrets(store, vault, workspace_id).values())


def env_mapping(
    store: WorkspaceStore,
    workspace: str,
    given: list[str] | dict[str, str] | None,
    env_keys: Collection[str] = (),
) -> dict[str, str] | None:
    """``secret_env`` as the agent takes it ({ENVVAR: name}), checked against the
    workspace's secrets before anything runs; None when none is asked for."""
    if not given:
        return None
    from pyro_mcp.workspace.secret_input import secret_env_mapping

    record = store.get(workspace)
    names = [s.name for s in store.secrets(record.id)]
    mapping = secret_env_mapping(given, names, workspace=record.id, env_keys=env_keys)
    if not mapping:
        raise InvalidArgument("secret_env names no secret")
    return mapping
