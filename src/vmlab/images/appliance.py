"""The `appliance` image: Debian's cloud kernel plus an initramfs with busybox, python3.11 and
the vmlab agent. Boots to the agent in a few seconds under TCG; no disk.

What is in it, and why:
  /init                    agent/init.sh: mounts, insmods /vmlab/modules.list, runs the agent
  /vmlab/agent.py          agent/agent.py, shipped as source (it is the script python runs)
  /vmlab/udhcpc.sh         agent/udhcpc.sh, the busybox udhcpc hook
  /bin/busybox             busybox-static; /init links its applets at boot
  /usr/bin/python3.11      python3.11-minimal, plus the shared libraries it and the chosen
                           extension modules need (found from DT_NEEDED, not listed by hand)
  /usr/lib/python3.11      only the stdlib modules the agent imports, found by importing the
                           agent in the guest's own interpreter at build time; byte-compiled by
                           that interpreter (same magic number by construction), sourceless
  /lib/modules/*.ko        virtio_net, virtio_pci, virtio_console and the vsock transport, plus
                           their dependencies in load order (from each module's depends=)

The kernel is the PVH-bootable `vmlinux` taken out of the package's bzImage, so QEMU's
`-kernel vmlinux` skips real-mode setup and decompression (measurements-boot-snapshot §2).

Caching: `recipe_key()` hashes every local input (this recipe's version and lists, the agent,
init and udhcpc sources, the kernel args). The package set resolved for a key is remembered in
`images/appliance.resolved.json`, so a cached ensure_image() reads three small files and runs
no apt command. Newer Debian package versions (security updates) are picked up only when the
recipe key changes or on `force=True`; that keeps the digest, and so every snapshot built on
it, stable between runs.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from importlib import resources
from pathlib import Path

from ..errors import ImageBuildError
from . import cache, debs
from .cpio import write_tree
from .elf import ElfFile

# Bump when the build procedure changes in a way the inputs below do not capture.
RECIPE_VERSION = 1
NAME = "appliance"
MEMORY_MB = 256

KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
PACKAGES = ["busybox-static", "python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib",
            "libc6", "zlib1g", "libexpat1"]
# Roots of the module set; dependencies are added from each module's depends= field.
# CONFIG_PACKET and CONFIG_UNIX are =y in the cloud kernel, so udhcpc needs no af_packet.ko.
MODULE_ROOTS = ["virtio_pci", "virtio_net", "virtio_console", "vmw_vsock_virtio_transport"]
# Stdlib modules the agent needs that importing it does not load: the idna codec is used by
# socket.getaddrinfo() on every host name.
EXTRA_PY_MODULES = ["encodings.idna", "encodings.ascii", "encodings.latin_1", "encodings.utf_8"]
# Optional imports to keep out: their extension modules need libraries the image does not carry
# (libssl, libbz2, liblzma), and every stdlib user of them falls back when they are missing.
EXCLUDED_PY_MODULES = ["ssl", "_ssl", "_hashlib", "bz2", "_bz2", "lzma", "_lzma"]

# T3 from measurements-boot-snapshot §2, for the `pc` machine: acpi=off is the fastest `pc`
# setup measured. tsc_early_khz= and lpj= are left out on purpose: only `microvm` (no PIT to
# calibrate against) needs tsc_early_khz, `pc` calibrates the TSC against the PIT, and with
# a known TSC the kernel derives loops_per_jiffy itself. panic=-1 plus QEMU's -no-reboot turns
# a kernel panic (e.g. /init died) into a QEMU exit instead of a hung guest.
KERNEL_ARGS = ("console=ttyS0 quiet mitigations=off nokaslr cryptomgr.notests random.trust_cpu=on "
               "audit=0 apparmor=0 security=none ima_appraise=off 8250.nr_uarts=1 i8042.noaux "
               "i8042.nokbd nowatchdog tsc=reliable no_timer_check acpi=off panic=-1")

_AGENT_FILES = {"agent.py": "vmlab/agent.py", "init.sh": "init", "udhcpc.sh": "vmlab/udhcpc.sh",
                "screen.py": "vmlab/screen.py"}
_LZ4_LEGACY_MAGIC = b"\x02\x21\x4c\x18"
_MULTIARCH = "x86_64-linux-gnu"


def agent_sources() -> dict[str, bytes]:
    """The agent package's files that go into the image, by file name."""
    pkg = resources.files("vmlab.agent")
    return {name: (pkg / name).read_bytes() for name in _AGENT_FILES}


def recipe_key(sources: dict[str, bytes] | None = None, kernel_args: str = KERNEL_ARGS) -> str:
    """sha256 of every local input of the recipe (no package versions: see image_digest)."""
    sources = agent_sources() if sources is None else sources
    return cache.digest_of({
        "recipe": RECIPE_VERSION,
        "kernel_meta": KERNEL_META_PACKAGE,
        "packages": PACKAGES,
        "modules": MODULE_ROOTS,
        "extra_py": EXTRA_PY_MODULES,
        "excluded_py": EXCLUDED_PY_MODULES,
        "sources": {k: hashlib.sha256(v).hexdigest() for k, v in sorted(sources.items())},
        "kernel_args": kernel_args,
    })


def image_digest(key: str, packages: dict[str, dict]) -> str:
    """The image digest: the recipe key plus each package's exact version and .deb sha256."""
    return cache.digest_of({"recipe_key": key, "packages": packages})


# ---------------------------------------------------------------- entry point

def ensure(*, force: bool = False, progress=None):
    """Return the cached appliance image, building it first if needed (see module docstring)."""
    from . import BuiltImage  # the dataclass lives in the package; import here to avoid a cycle

    report = progress or (lambda *a: None)
    key = recipe_key()
    manifest_path = cache.cache_root() / "images" / f"{NAME}.resolved.json"
    if not force:
        packages = cache.load_manifest(manifest_path, key)
        if packages is not None:
            hit = _load_entry(BuiltImage, image_digest(key, packages))
            if hit is not None:
                return hit

    t0 = time.monotonic()
    report(f"{NAME}: resolving Debian packages", None, None)
    kernel_pkg, fetched, packages = debs.fetch_with_kernel(
        KERNEL_META_PACKAGE, PACKAGES, cache.debs_dir(),
        progress=lambda m, d, t: report(f"{NAME}: {m}", d, t))
    digest = image_digest(key, packages)
    cache.images_dir()  # creates it
    cache.save_manifest(manifest_path, key, packages)
    if not force:
        hit = _load_entry(BuiltImage, digest)
        if hit is not None:
            return hit

    with cache.building(NAME) as tmp:
        meta = _build(tmp, fetched, kernel_pkg, digest, key, report)
        cache.publish(tmp, NAME, digest, replace=force)
    report(f"{NAME}: built {digest[:12]} in {time.monotonic() - t0:.1f} s "
           f"(initramfs {meta['initrd_bytes'] / 1e6:.1f} MB)", None, None)
    image = _load_entry(BuiltImage, digest)
    if image is None:
        raise ImageBuildError(f"{NAME}: published entry {cache.entry_dir(NAME, digest)} is unreadable")
    return image






def _load_entry(cls, digest: str):
    found = cache.read_entry_meta(NAME, digest)
    if found is None:
        return None
    entry, meta = found
    return cls(name=NAME, digest=digest, kernel=entry / "vmlinux", initrd=entry / "initrd.cpio",
               kernel_args=meta["kernel_args"], os=meta["os"], memory_mb=meta.get("memory_mb", MEMORY_MB),
               kind=NAME)


# ---------------------------------------------------------------- the build

def _build(tmp: Path, fetched: dict[str, debs.Deb], kernel_pkg: str, digest: str, key: str, report) -> dict:
    staging, tree, entry = tmp / "staging", tmp / "initrd", tmp / "entry"
    for d in (staging, tree, entry):
        d.mkdir()
    for i, deb in enumerate(fetched.values()):
        report(f"{NAME}: unpacking {deb.name} ({i + 1}/{len(fetched)})", i, len(fetched))
        debs.extract(deb, staging)

    report(f"{NAME}: extracting vmlinux", None, None)
    vmlinuz = sorted((staging / "boot").glob("vmlinuz-*"))
    if len(vmlinuz) != 1:
        raise ImageBuildError(f"{kernel_pkg}: expected one boot/vmlinuz-*, found {vmlinuz}")
    release = vmlinuz[0].name[len("vmlinuz-"):]
    (entry / "vmlinux").write_bytes(extract_vmlinux(vmlinuz[0].read_bytes()))

    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "tmp", "run", "etc", "root",
              "lib/modules", "lib64", f"lib/{_MULTIARCH}", "vmlab", "var"):
        (tree / d).mkdir(parents=True, exist_ok=True)

    _copy(staging / "bin/busybox", tree / "bin/busybox", 0o755)
    for name, dest in _AGENT_FILES.items():
        (tree / dest).write_bytes(agent_sources()[name])
        (tree / dest).chmod(0o755 if name.endswith(".sh") else 0o644)

    modules = _install_modules(staging / "lib/modules" / release, tree)
    report(f"{NAME}: modules {' '.join(modules)}", None, None)

    report(f"{NAME}: selecting python stdlib for the agent", None, None)
    py_version, ext_modules = _install_python(staging, tree)
    _install_libraries(staging, tree, [tree / "usr/bin/python3.11", *ext_modules])

    bb_version = fetched["busybox-static"].version.split(":")[-1].split("-")[0]
    os_text = (f"Debian 12 appliance (kernel {release}, python {py_version}, busybox {bb_version})")
    (tree / "vmlab/os").write_text(os_text + "\n")
    (tree / "etc/resolv.conf").write_text("")
    (tree / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (tree / "etc/group").write_text("root:x:0:\n")

    report(f"{NAME}: packing initramfs", None, None)
    with open(entry / "initrd.cpio", "wb") as out:
        w = write_tree(tree, out)
        if not (tree / "dev/console").exists():
            w.char_device("dev/console", 5, 1)  # so /init has a console before devtmpfs is up
        w.close()
    size = (entry / "initrd.cpio").stat().st_size
    report(f"{NAME}: packed initramfs ({size / 1e6:.1f} MB)", None, None)
    meta = {
        "name": NAME, "digest": digest, "recipe_key": key, "recipe_version": RECIPE_VERSION,
        "kernel_args": KERNEL_ARGS, "os": os_text, "memory_mb": MEMORY_MB, "kernel_release": release,
        "modules": modules, "initrd_bytes": size,
        "packages": {n: {"version": d.version, "sha256": d.sha256} for n, d in sorted(fetched.items())},
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (entry / "image.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
    return meta


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The uncompressed ELF kernel inside a bzImage whose payload is LZ4 (legacy frame format).

    `lz4 -dc` exits 1 on the bytes after the stream (the kernel appends the decompressed size),
    so success is judged by the output: an ELF that carries the Xen PVH entry note.
    """
    lz4 = shutil.which("lz4")
    if lz4 is None:
        raise ImageBuildError("lz4 not found: it unpacks the kernel; install it with `apt-get install lz4`")
    start = bzimage.find(_LZ4_LEGACY_MAGIC)
    while start >= 0:
        proc = subprocess.run([lz4, "-dc"], input=bzimage[start:], capture_output=True)
        if proc.stdout[:4] == b"\x7fELF":
            if not ElfFile(proc.stdout, "vmlinux").has_pvh_note():
                raise ImageBuildError("the kernel's vmlinux has no Xen PVH note; QEMU cannot boot it with -kernel")
            return proc.stdout
        start = bzimage.find(_LZ4_LEGACY_MAGIC, start + 1)
    raise ImageBuildError("no LZ4-compressed ELF kernel found in the bzImage (is the kernel LZ4-compressed?)")


def module_load_order(index: dict[str, Path], roots: list[str]) -> list[str]:
    """Roots and their dependencies, each after everything it depends on (depth-first)."""
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order:
            return
        if name in visiting:
            raise ImageBuildError(f"kernel module dependency cycle through {name}")
        if name not in index:
            raise ImageBuildError(f"kernel module {name} not found (built in, or missing from the package?)")
        visiting.add(name)
        deps = ElfFile.read(index[name]).modinfo().get("depends", "")
        for dep in filter(None, deps.split(",")):
            visit(dep.replace("-", "_"))
        visiting.discard(name)
        order.append(name)

    for root in roots:
        visit(root)
    return order


def _install_modules(moddir: Path, tree: Path) -> list[str]:
    index = {p.name[:-3].replace("-", "_"): p for p in moddir.rglob("*.ko")}
    if not index:
        compressed = next(moddir.rglob("*.ko.*"), None)
        raise ImageBuildError(f"no uncompressed .ko files under {moddir}"
                              + (f" (found {compressed.name}; compressed modules are not supported)" if compressed else ""))
    order = module_load_order(index, MODULE_ROOTS)
    for name in order:
        _copy(index[name], tree / "lib/modules" / f"{name}.ko", 0o644)
    (tree / "vmlab/modules.list").write_text("".join(f"{m}\n" for m in order))
    return order


# Runs in the guest's interpreter (from the staging tree): import the agent as the guest would,
# record which stdlib files that loaded, then byte-compile exactly those into the image tree.
_PROBE = r"""
import sys
excluded, extra, agent, stdlib, dest = sys.argv[1].split(","), sys.argv[2].split(","), sys.argv[3], sys.argv[4], sys.argv[5]
for name in excluded:
    sys.modules[name] = None  # makes `import name` raise ImportError, as it will in the guest
import importlib.util
spec = importlib.util.spec_from_file_location("vmlab_agent_probe", agent)
spec.loader.exec_module(importlib.util.module_from_spec(spec))
for name in extra:
    __import__(name)
files = sorted({m.__file__ for m in list(sys.modules.values())
                if getattr(m, "__file__", None) and m.__file__.startswith(stdlib + "/")})
import os, py_compile
for f in files:
    rel = os.path.relpath(f, stdlib)
    if f.endswith(".py"):
        out = os.path.join(dest, rel + "c")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        py_compile.compile(f, cfile=out, dfile="/usr/lib/python3.11/" + rel, doraise=True,
                           invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
    print(rel)
print("VERSION", sys.version.split()[0])
"""


def _install_python(staging: Path, tree: Path) -> tuple[str, list[Path]]:
    stdlib = staging / "usr/lib/python3.11"
    dest = tree / "usr/lib/python3.11"
    dest.mkdir(parents=True)
    _copy(staging / "usr/bin/python3.11", tree / "usr/bin/python3.11", 0o755)
    (tree / "usr/bin/python3").symlink_to("python3.11")
    loader = staging / "lib64/ld-linux-x86-64.so.2"
    libpath = f"{staging}/lib/{_MULTIARCH}:{staging}/usr/lib/{_MULTIARCH}"
    # Run the guest's python through the guest's loader so that it uses the guest's libc.
    argv = [str(_staged(staging, loader)),
            "--library-path", libpath, str(staging / "usr/bin/python3.11"), "-c", _PROBE,
            ",".join(EXCLUDED_PY_MODULES), ",".join(EXTRA_PY_MODULES),
            str(tree / "vmlab/agent.py"), str(stdlib), str(dest)]
    env = {"PYTHONHOME": str(staging / "usr"), "LC_ALL": "C", "PATH": "/usr/bin:/bin",
           "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    if proc.returncode != 0:
        raise ImageBuildError(f"running the guest's python3.11 on the host to select the stdlib failed "
                              f"(exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    version, ext_modules = "", []
    for line in proc.stdout.splitlines():
        if line.startswith("VERSION "):
            version = line.split()[1]
        elif line.endswith(".so"):
            _copy(stdlib / line, dest / line, 0o644)
            ext_modules.append(dest / line)
    return version, ext_modules


def _staged(staging: Path, path: Path) -> Path:
    """Resolve a symlink inside the staging tree (absolute targets are relative to staging)."""
    for _ in range(10):
        if not path.is_symlink():
            return path
        target = os.readlink(path)
        path = staging / target.lstrip("/") if target.startswith("/") else path.parent / target
    raise ImageBuildError(f"symlink loop at {path}")


def _install_libraries(staging: Path, tree: Path, binaries: list[Path]) -> None:
    """Copy the DT_NEEDED closure of `binaries` from the staging tree, plus the ELF loader."""
    dirs = [f"lib/{_MULTIARCH}", f"usr/lib/{_MULTIARCH}", "lib", "usr/lib"]
    todo = list(binaries)
    seen: set[str] = set()
    while todo:
        for soname in ElfFile.read(todo.pop()).needed():
            if soname in seen or soname.startswith("ld-linux"):
                continue
            seen.add(soname)
            for d in dirs:
                src = staging / d / soname
                if src.exists() or src.is_symlink():
                    out = tree / d / soname
                    out.parent.mkdir(parents=True, exist_ok=True)
                    _copy(_staged(staging, src), out, 0o755)
                    todo.append(out)
                    break
            else:
                raise ImageBuildError(f"shared library {soname} is not in the image's packages; "
                                      f"add its Debian package to PACKAGES in {__name__}")
    loader = f"lib/{_MULTIARCH}/ld-linux-x86-64.so.2"
    _copy(_staged(staging, staging / loader), tree / loader, 0o755)
    (tree / "lib64/ld-linux-x86-64.so.2").symlink_to(f"/{loader}")


def _copy(src: Path, dst: Path, mode: int) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    dst.chmod(mode)
