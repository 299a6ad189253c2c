"""The cloud kernel's initramfs: load the virtio modules, mount root=, switch to init=.

Debian's cloud kernel builds virtio-mmio, virtio-blk, virtio-net, virtio-console and the
vsock stack as modules, so it cannot reach a root disk by itself. This archive holds a
static busybox, those modules (with everything they depend on, in dependency order,
worked out from modules.dep or, when the package ships none, from each module's
``depends=`` field) and a short ``/init`` that loads them, mounts the device named by
``root=`` and execs ``init=`` on it. The guest then sees what the built-in kernel gives
it: the root file system with devtmpfs on /dev and nothing else mounted.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pyro_mcp.errors import BuildError
from pyro_mcp.runtime.kernel_images import mapped, module_info

# What the guest needs, by module name; built-in ones are skipped.
WANTED_MODULES: tuple[str, ...] = (
    "virtio_mmio",
    "virtio_blk",
    "virtio_net",
    "virtio_console",
    "virtio_rng",
    "vmw_vsock_virtio_transport",
    "ext4",
)

BUSYBOX_APPLETS: tuple[str, ...] = (
    "sh",
    "cat",
    "insmod",
    "mkdir",
    "mount",
    "sleep",
    "switch_root",
    "umount",
)

LOAD_ORDER_FILE = "lib/modules/load-order"

INIT_SCRIPT = """\
#!/bin/sh
# pyro-mcp initramfs /init for Debian's cloud kernel. On any failure it exits: the
# kernel then panics and, with panic=1 and -no-reboot, the VM stops instead of hanging.
export PATH=/bin

fail() {
    echo "pyro-initramfs: $*" >&2
    exit 1
}

mount -t proc proc /proc || fail "cannot mount /proc"
mount -t sysfs sysfs /sys || fail "cannot mount /sys"
mount -t devtmpfs devtmpfs /dev || fail "cannot mount /dev"

root=
init=/sbin/init
mode=ro
fstype=ext4
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        root=*) root="${arg#root=}" ;;
        init=*) init="${arg#init=}" ;;
        rootfstype=*) fstype="${arg#rootfstype=}" ;;
        rw) mode=rw ;;
        ro) mode=ro ;;
    esac
done

while read -r module; do
    [ -n "$module" ] || continue
    insmod "/lib/modules/$module" || fail "cannot load module $module"
done < /lib/modules/load-order

case "$root" in
    /dev/*) ;;
    "") fail "no root= on the kernel command line" ;;
    *) fail "root=$root is not supported: give a /dev/ path such as /dev/vda" ;;
esac
# Wait for the disk by the clock, not by a count of tries: under TCG each try is slow.
read -r now rest < /proc/uptime
deadline=$((${now%.*} + 5))
while [ ! -b "$root" ]; do
    read -r now rest < /proc/uptime
    [ "${now%.*}" -lt "$deadline" ] || fail "root device $root did not appear within 5 s"
    sleep 0.01
done
mount -t "$fstype" -o "$mode" "$root" /newroot || fail "cannot mount $root on /newroot"

if [ -d /newroot/dev ]; then
    mount -o move /dev /newroot/dev || fail "cannot move /dev to the root disk"
else
    umount /dev
fi
umount /sys
umount /proc
exec switch_root /newroot "$init" "$@"
"""


def module_name(path: str) -> str:
    """The kernel's name for a module file: basename without .ko, '-' read as '_'."""
    base = path.rsplit("/", 1)[-1]
    return base.split(".ko", 1)[0].replace("-", "_")


@dataclass
class ModuleTree:
    """The modules of one kernel release: files, dependencies, what is built in."""

    root: Path  # lib/modules/<release>
    files: dict[str, str] = field(default_factory=dict)  # name -> path relative to root
    depends: dict[str, list[str]] = field(default_factory=dict)  # name -> names first
    soft_pre: dict[str, list[str]] = field(default_factory=dict)  # loaded first if shipped
    builtin: set[str] = field(default_factory=set)


def read_module_tree(root: Path) -> ModuleTree:
    """Index ``root`` (a lib/modules/<release> directory) by module name."""
    tree = ModuleTree(root)
    builtin = root / "modules.builtin"
    if builtin.is_file():
        tree.builtin = {module_name(line) for line in builtin.read_text().split() if line}
    dep_file = root / "modules.dep"
    if dep_file.is_file():
        for line in dep_file.read_text().splitlines():
            target, sep, rest = line.partition(":")
            if not sep:
                continue
            name = module_name(target.strip())
            tree.files[name] = target.strip()
            tree.depends[name] = [module_name(dep) for dep in rest.split()]
        return tree
    for path in sorted(root.rglob("*.ko*")):
        relative = path.relative_to(root).as_posix()
        name = module_name(relative)
        tree.files[name] = relative
        if not path.name.endswith(".ko"):
            continue  # compressed: rejected if it is ever needed (see load_order)
        try:
            with mapped(path) as data:
                info = module_info(data)
        except ValueError as exc:
            raise BuildError(
                f"{relative} is not a readable kernel module: {exc}",
                hint="delete the downloaded cloud kernel .deb so it is fetched again",
            ) from exc
        deps = [dep for value in info.get("depends", []) for dep in value.split(",") if dep]
        tree.depends[name] = [module_name(dep) for dep in deps]
        tree.soft_pre[name] = [module_name(dep) for dep in _soft_pre(info.get("softdep", []))]
    return tree


def _soft_pre(values: list[str]) -> list[str]:
    """Names after "pre:" in softdep strings such as "pre: crc32c post: foo"."""
    names: list[str] = []
    for value in values:
        section = None
        for word in value.split():
            if word.endswith(":"):
                section = word
            elif section == "pre:":
                names.append(word)
    return names


def load_order(tree: ModuleTree, wanted: Iterable[str]) -> list[str]:
    """Module files (relative to the tree) to insmod, each after all its dependencies."""
    order: list[str] = []
    done: set[str] = set()
    visiting: set[str] = set()

    def visit(name: str, required: bool) -> None:
        if name in done or name in tree.builtin:
            return
        if name not in tree.files:
            if not required:
                return  # a soft dependency this kernel does not ship: modprobe skips it too
            raise BuildError(
                f"module {name} is neither built in nor shipped in {tree.root}",
                hint="the pinned cloud kernel package changed; update WANTED_MODULES",
            )
        if name in visiting:
            raise BuildError(f"module dependency cycle through {name}", hint="report this")
        visiting.add(name)
        for dep in tree.soft_pre.get(name, []):
            visit(dep, False)
        for dep in tree.depends.get(name, []):
            visit(dep, True)
        visiting.discard(name)
        done.add(name)
        relative = tree.files[name]
        if not relative.endswith(".ko"):
            raise BuildError(
                f"module {relative} is compressed, which this initramfs does not support",
                hint="pin a cloud kernel package with uncompressed modules (bookworm's)",
            )
        order.append(relative)

    for name in wanted:
        visit(name, True)
    return order


@dataclass(frozen=True)
class CpioEntry:
    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


S_IFDIR, S_IFREG, S_IFLNK, S_IFCHR = 0o040000, 0o100000, 0o120000, 0o020000


def newc_archive(entries: Sequence[CpioEntry]) -> bytes:
    """A newc ("070701") cpio archive, owner root and mtime 0: same input, same bytes."""
    out = bytearray()
    trailer = CpioEntry("TRAILER!!!", 0)
    for inode, entry in enumerate([*entries, trailer], start=1):
        name = entry.name.encode() + b"\0"
        nlink = 2 if entry.mode & 0o170000 == S_IFDIR else 1
        fields = (
            inode, entry.mode, 0, 0, nlink, 0, len(entry.data),
            0, 0, entry.rdev[0], entry.rdev[1], len(name), 0,
        )  # fmt: skip
        out += b"070701" + "".join(f"{value:08x}" for value in fields).encode()
        out += name
        out += b"\0" * (-len(out) % 4)
        out += entry.data
        out += b"\0" * (-len(out) % 4)
    return bytes(out)


def initramfs_entries(busybox: bytes, modules: dict[str, bytes]) -> list[CpioEntry]:
    """The archive's contents; ``modules`` maps file name (load order) -> module bytes."""
    entries = [
        CpioEntry(name, S_IFDIR | 0o755)
        for name in ("bin", "dev", "lib", "lib/modules", "newroot", "proc", "sys")
    ]
    entries.append(CpioEntry("dev/console", S_IFCHR | 0o600, rdev=(5, 1)))
    entries.append(CpioEntry("bin/busybox", S_IFREG | 0o755, busybox))
    entries.extend(
        CpioEntry(f"bin/{applet}", S_IFLNK | 0o777, b"busybox") for applet in BUSYBOX_APPLETS
    )
    entries.append(CpioEntry("init", S_IFREG | 0o755, INIT_SCRIPT.encode()))
    entries.extend(
        CpioEntry(f"lib/modules/{name}", S_IFREG | 0o644, data) for name, data in modules.items()
    )
    order = "".join(f"{name}\n" for name in modules)
    entries.append(CpioEntry(LOAD_ORDER_FILE, S_IFREG | 0o644, order.encode()))
    return entries


def build_initramfs(busybox: Path, module_root: Path, output: Path) -> list[str]:
    """Write the initramfs for the kernel whose modules are in ``module_root``.

    Returns the module files it loads, in order.
    """
    tree = read_module_tree(module_root)
    order = load_order(tree, WANTED_MODULES)
    modules: dict[str, bytes] = {}
    for relative in order:
        name = relative.rsplit("/", 1)[-1]
        if name in modules:
            raise BuildError(f"two modules share the file name {name}", hint="report this")
        modules[name] = (module_root / relative).read_bytes()
    output.write_bytes(newc_archive(initramfs_entries(busybox.read_bytes(), modules)))
    return order
