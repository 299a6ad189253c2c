"""Persistent workspaces: the model, its store, and the work done inside them."""
