"""Disk images: copy-on-write overlays, workspace disks, checkpoints."""
