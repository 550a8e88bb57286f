"""The `cloud` image kind: any qcow2 given by URL (`https://` or `file://`) and sha256, booted
by its own bootloader, with a NoCloud seed that lets cloud-init install vmlab's SSH key.

    ImageSpec("cloud", url="https://cloud.debian.org/.../debian-12-generic-amd64.qcow2",
              sha256="...")

Entry `images/cloud+<sha256[:12]>-<digest12>/`:
  disk.qcow2            the download, verified: a sha256 mismatch is an ImageBuildError and
                        the file is thrown away, never used
  seed.iso              ISO 9660 volume `cidata` (Joliet + Rock Ridge names) holding
                        `meta-data`, `user-data` (#cloud-config: root's authorized key, root
                        login allowed, sshd on) and `network-config` (only the prep NIC, by
                        MAC, static); attached read-only as the second disk
  ssh_key, ssh_key.pub  generated once per entry, like the debian image's

From there a cloud image goes the debian image's way: snapshot preparation boots it with the
prep NIC, waits for SSH, installs the agent as a systemd unit, saves. What it needs from the
guest: cloud-init with the NoCloud datasource, sshd, python3 (3.9+), iproute2 and systemd.
NIC names do not matter (the agent takes NICs in PCI order: eth0 or ens3 alike), and
preparation waits for cloud-init to finish before installing the agent. The digest is the
sha256 plus this recipe's version and seed template: the URL is only where the bytes come
from. Without network access, `vmlab image cloud-qcow2` (images/cloudbuild.py) builds one.
"""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

from ..errors import ConfigError, ImageBuildError
from . import cache, list_images
from .debian import PREP_GUEST_IP, PREP_MAC

__all__ = ["ensure", "fetch_verified", "make_seed", "USER_DATA_TEMPLATE"]

RECIPE_VERSION = 2  # 2: the entry holds a static busybox for the agent
NAME = "cloud"
MEMORY_MB = next(kind.memory_mb for kind in list_images() if kind.name == NAME)
BUSYBOX_PACKAGE = "busybox-static"
#: The cloud-config in the seed; `{pubkey}` is the entry's SSH public key.
USER_DATA_TEMPLATE = """#cloud-config
disable_root: false
ssh_pwauth: false
users:
  - name: root
    ssh_authorized_keys:
      - {pubkey}
runcmd:
  - [systemctl, enable, --now, ssh]
"""
#: Only the prep NIC (matched by MAC) gets an address, static and with no default route, as
#: in the debian image: vnet NICs are the agent's to configure after a restore.
NETWORK_CONFIG = f"""version: 2
ethernets:
  vmlabprep:
    match:
      macaddress: "{PREP_MAC}"
    addresses: [{PREP_GUEST_IP}/24]
"""
_CHUNK = 1 << 20


def name_for(sha256: str) -> str:
    return f"{NAME}+{sha256.lower()[:12]}"


def _check_scheme(url: str) -> None:
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme not in ("https", "file"):
        raise ConfigError(f"image 'cloud': url {url!r} must be https:// or file:// (plain http "
                          f"would be checked only by its sha256; use https)")


def check_source(url, sha256) -> tuple[str, str]:
    """(url, sha256 in lower case) if they can name a cloud image, else a ConfigError."""
    if not url or not sha256:
        raise ConfigError("image 'cloud' needs url= (https:// or file://) and sha256= of the "
                          "qcow2: ImageSpec('cloud', url=..., sha256=...)")
    if not isinstance(url, str):
        raise ConfigError(f"image 'cloud': url must be a str, not {type(url).__name__}")
    _check_scheme(url)
    if not isinstance(sha256, str) or len(sha256) != 64 or any(
            c not in "0123456789abcdef" for c in sha256.lower()):
        raise ConfigError(f"image 'cloud': sha256 {sha256!r} is not 64 hex digits (the output "
                          f"of `sha256sum image.qcow2`)")
    return url, sha256.lower()


def ensure(*, url: str | None, sha256: str | None, force: bool = False, progress=None):
    """The cached cloud image for (url, sha256), downloading and seeding it if needed."""
    from . import BuiltImage
    report = progress or (lambda *a: None)
    url, sha256 = check_source(url, sha256)
    name = name_for(sha256)
    digest = cache.digest_of({"recipe": RECIPE_VERSION, "sha256": sha256,
                              "user_data": USER_DATA_TEMPLATE, "network": NETWORK_CONFIG})
    entry = cache.entry_dir(name, digest)
    if not force and (entry / "image.json").exists():
        return _load(BuiltImage, name, digest)
    cache.images_dir()
    t0 = time.monotonic()
    with cache.building(name) as tmp:
        out = tmp / "entry"
        out.mkdir()
        size = fetch_verified(url, sha256, out / "disk.qcow2", report=report, what=name)
        _check_qcow2(out / "disk.qcow2", url)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"vmlab-{name}",
                        "-f", str(out / "ssh_key")], check=True, capture_output=True)
        pubkey = (out / "ssh_key.pub").read_text().strip()
        (out / "seed.iso").write_bytes(make_seed(pubkey, instance_id=f"vmlab-{digest[:12]}"))
        busybox = fetch_busybox(out / "busybox", report)
        meta = {"name": name, "digest": digest, "url": url, "sha256": sha256, "bytes": size,
                "os": f"cloud image {Path(urllib.parse.urlsplit(url).path).name} "
                      f"(sha256 {sha256[:12]})",
                "busybox": busybox, "memory_mb": MEMORY_MB, "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        (out / "image.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
        cache.publish(tmp, name, digest)
    report(f"{name}: fetched and seeded in {time.monotonic() - t0:.1f} s", None, None)
    return _load(BuiltImage, name, digest)


def _load(cls, name: str, digest: str):
    entry = cache.entry_dir(name, digest)
    meta = json.loads((entry / "image.json").read_text())
    # No kernel of ours: QEMU's firmware boots the image's own bootloader from disk0.
    return cls(name=name, digest=digest, kernel=None, initrd=None, kernel_args="",
               os=meta["os"], memory_mb=meta["memory_mb"], disk=entry / "disk.qcow2",
               ssh_key=entry / "ssh_key", kind=NAME, seed=entry / "seed.iso",
               agent_busybox=entry / "busybox")


def fetch_busybox(dest: Path, report) -> str:
    """Debian's busybox-static binary at `dest`; returns its package version. A cloud image
    need not have busybox; the agent brings its own for DHCP and ping."""
    from . import debs
    report(f"{NAME}: fetching busybox-static for the agent", None, None)
    versions = debs.resolve_candidates([BUSYBOX_PACKAGE])
    deb = debs.download(versions, cache.debs_dir())[BUSYBOX_PACKAGE]
    staging = dest.parent / ".busybox"
    debs.extract(deb, staging)
    shutil.move(staging / "bin/busybox", dest)
    shutil.rmtree(staging)
    dest.chmod(0o755)
    return deb.version


def fetch_verified(url: str, sha256: str, dest: Path, *, report=None, what: str = NAME) -> int:
    """Download `url` (https:// or file://) to `dest`, hashing as it goes. Raises
    ImageBuildError and deletes `dest` when the content's sha256 is not `sha256`."""
    _check_scheme(url)
    report = report or (lambda *a: None)
    h = hashlib.sha256()
    done = 0
    try:
        with urllib.request.urlopen(url, timeout=60) as resp, open(dest, "wb") as out:
            total = int(resp.headers.get("Content-Length") or 0) or None
            last = 0.0
            while chunk := resp.read(_CHUNK):
                h.update(chunk)
                out.write(chunk)
                done += len(chunk)
                if time.monotonic() - last > 2:
                    last = time.monotonic()
                    report(f"{what}: downloading {done >> 20} MB"
                           + (f" of {total >> 20} MB" if total else ""), done, total)
    except (OSError, ValueError) as err:
        dest.unlink(missing_ok=True)
        raise ImageBuildError(f"{what}: cannot fetch {url}: {err}") from err
    got = h.hexdigest()
    if got != sha256.lower():
        dest.unlink(missing_ok=True)
        raise ImageBuildError(f"{what}: {url} has sha256 {got}, not the {sha256} given; the "
                              f"file changed or the checksum is wrong: it was not used")
    return done


def _check_qcow2(path: Path, url: str) -> None:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"QFI\xfb":
        raise ImageBuildError(f"{url} is not a qcow2 image (magic {magic!r}); give a .qcow2")
    if shutil.which("qemu-img"):
        proc = subprocess.run(["qemu-img", "check", "-q", str(path)], capture_output=True, text=True)
        # 3: leaked clusters only (space wasted, data intact); 2 is corruption, 1 unreadable.
        if proc.returncode not in (0, 3):
            raise ImageBuildError(f"{url}: qemu-img check failed: {proc.stderr.strip()[-500:]}")


def make_seed(pubkey: str, *, instance_id: str) -> bytes:
    """A NoCloud seed: ISO 9660 volume `cidata` with meta-data and user-data at its root."""
    try:
        import pycdlib
    except ImportError as err:  # a dependency of vmlab: only a broken install lacks it
        raise ImageBuildError("pycdlib is missing: reinstall vmlab (pip install -e .)") from err
    files = {"meta-data": f"instance-id: {instance_id}\nlocal-hostname: vmlab\n".encode(),
             "user-data": USER_DATA_TEMPLATE.format(pubkey=pubkey).encode(),
             "network-config": NETWORK_CONFIG.encode()}
    iso = pycdlib.PyCdlib()
    # cloud-init finds the seed by its volume label; Joliet and Rock Ridge keep the dashed
    # lower-case names readable whatever the guest's ISO 9660 mount options.
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident="cidata")
    for i, (fname, data) in enumerate(files.items()):
        iso.add_fp(io.BytesIO(data), len(data), f"/FILE{i};1", rr_name=fname,
                   joliet_path=f"/{fname}")
    out = io.BytesIO()
    iso.write_fp(out)
    iso.close()
    return out.getvalue()
