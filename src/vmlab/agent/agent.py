"""vmlab guest agent: dials the driver and answers its HTTP requests.

Runs inside the guest (the appliance image starts it from /init as `python3 -u /vmlab/agent.py`)
and on the host for unit tests (`--driver 127.0.0.1:PORT --no-dhcp`). Python stdlib only, and
every import sits at the top of this file: the image builder imports this module in the guest's
interpreter to find which stdlib modules the initramfs must carry.

Wire protocol (the driver side is written to exactly this):
  1. The agent connects to the driver over TCP and sends one line:
     `VMLAB-AGENT 1 {"mac": ..., "hostname": ..., "version": ..., "conn_id": N,
     "instance": ...}\\n`; `instance` is new with each agent process, so the driver can drop
     the connections of one that died without closing them.
  2. The connection then carries HTTP/1.1 with the driver as the client and the agent as the
     server: keep-alive, every body with Content-Length, JSON bodies.
  3. The agent keeps IDLE_CONNECTIONS connections idle at all times: when one receives its first
     request, or closes, another is dialled, up to MAX_CONNECTIONS in total.

Endpoints: GET /status, POST /exec, POST /ping, POST /http_get, POST /files/put,
POST /files/get (see the handler methods).
Console output is one line per fact, each starting with `vmlab-agent: `.
"""
from __future__ import annotations

import argparse
import base64
import fcntl
import http.client
import http.server
import io
import json
import os
import re
import select
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import threading
import time
import urllib.parse

AGENT_VERSION = "0.1.0"
HELLO_PREFIX = "VMLAB-AGENT 1 "
#: Names this agent process in its hellos. A restored snapshot resumes the same process, so
#: it keeps its value; a restarted agent gets a new one.
INSTANCE = f"{os.getpid()}-{os.urandom(4).hex()}"
DEFAULT_DRIVER = ("52.52.0.2", 8008)  # vnet's TEST_DRIVER_IPV4 / TEST_DRIVER_PORT
DEFAULT_HOSTNAME = "vmlab"
IDLE_CONNECTIONS = 2
MAX_CONNECTIONS = 16
CONNECT_TIMEOUT_S = 2.0
BACKOFF_START_S = 0.1
BACKOFF_CAP_S = 1.0
FAILURE_LOG_INTERVAL_S = 5.0
MARKS: dict[str, float] = {}


def mark(name: str) -> None:
    MARKS.setdefault(name, time.monotonic())
# Where the appliance image puts its files; absent on the host, where defaults apply.
UDHCPC_SCRIPT = "/vmlab/udhcpc.sh"
OS_FILE = "/vmlab/os"
EXEC_DEFAULT_TIMEOUT_S = 60.0
# After a timeout kill, how long to keep reading output from processes that escaped the
# process group (a daemon that called setsid) before giving up on their pipes.
EXEC_DRAIN_GRACE_S = 2.0

_log_lock = threading.Lock()


def log(message: str) -> None:
    """One line per fact on stdout, which in the guest is the serial console."""
    line = f"vmlab-agent: {message}\n"
    with _log_lock:
        try:
            sys.stdout.write(line)
            sys.stdout.flush()
        except OSError:
            # A getty starting on the same serial port (a cloud image runs one on ttyS0)
            # hangs the tty up: every descriptor open on it fails with EIO from then on.
            # Open the port afresh; a line that still cannot be written is dropped, never
            # fatal: the agent must outlive its console.
            if _reopen_stdout():
                try:
                    sys.stdout.write(line)
                    sys.stdout.flush()
                except OSError:
                    pass


def _reopen_stdout() -> bool:
    """Point fds 1 and 2 at a fresh open of the device stdout was (after a tty hangup)."""
    try:
        path = os.readlink("/proc/self/fd/1")
    except OSError:
        return False
    if not path.startswith("/dev/"):
        return False
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOCTTY | os.O_APPEND)
    except OSError:
        return False
    for target in (1, 2):
        if target == 1 or os.path.realpath(f"/proc/self/fd/{target}") == path:
            os.dup2(fd, target)
    os.close(fd)
    return True


# ---------------------------------------------------------------- configuration

def parse_host_port(text: str) -> tuple[str, int]:
    """'1.2.3.4:8008' -> ('1.2.3.4', 8008); raises ValueError on anything else."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def read_kernel_cmdline(path: str = "/proc/cmdline") -> dict[str, str]:
    """The `vmlab.*` keys of the kernel command line, e.g. {'vmlab.hostname': 'alice'}."""
    try:
        with open(path) as f:
            words = f.read().split()
    except OSError:
        return {}
    out = {}
    for word in words:
        key, sep, value = word.partition("=")
        if sep and key.startswith("vmlab."):
            out[key] = value
    return out


class Config:
    """The agent's settings: the kernel command line, overridden by command-line flags."""

    def __init__(self, driver: tuple[str, int], hostname: str, dhcp: bool,
                 driver6: tuple[str, int] | None = None):
        self.driver = driver
        #: the driver's IPv6 address, dialled when the IPv4 one fails (an IPv6-only node)
        self.driver6 = driver6
        self.hostname = hostname
        self.dhcp = dhcp

    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> "Config":
        parser = argparse.ArgumentParser(description="vmlab guest agent")
        parser.add_argument("--driver", help="HOST:PORT to dial (default: vmlab.driver= or 52.52.0.2:8008)")
        parser.add_argument("--hostname", help="name reported to the driver (default: the system's)")
        parser.add_argument("--no-dhcp", action="store_true", help="do not run udhcpc on the NICs (host-side tests)")
        args = parser.parse_args(argv)
        cmdline = read_kernel_cmdline()
        driver = DEFAULT_DRIVER
        text = args.driver or cmdline.get("vmlab.driver")
        if text:
            try:
                driver = parse_host_port(text)
            except ValueError as err:
                if args.driver:
                    parser.error(str(err))
                log(f"ignoring vmlab.driver={text!r}: {err}; using {DEFAULT_DRIVER[0]}:{DEFAULT_DRIVER[1]}")
        hostname = (args.hostname or cmdline.get("vmlab.hostname") or socket.gethostname()
                    or DEFAULT_HOSTNAME)
        driver6 = None
        if cmdline.get("vmlab.driver6") and not args.driver:
            try:
                driver6 = parse_host_port(cmdline["vmlab.driver6"])
            except ValueError as err:
                log(f"ignoring vmlab.driver6: {err}")
        return cls(driver=driver, hostname=hostname, dhcp=not args.no_dhcp, driver6=driver6)


# ---------------------------------------------------------------- facts about the system

def _read(path: str, default: str = "") -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return default


def interface_names() -> list[str]:
    try:
        return sorted(os.listdir("/sys/class/net"))
    except OSError:
        return [name for _, name in socket.if_nameindex()]


def interface_mac(name: str) -> str:
    return _read(f"/sys/class/net/{name}/address").lower()


def nic_names(sys_net: str = "/sys/class/net") -> list[str]:
    """The guest's hardware NICs in the order QEMU plugged them (PCI address order).

    vmlab's NIC i is the i-th of these, whatever the guest calls it: the kernel's ethN, or
    udev's predictable ens3/enp0s4 in a cloud image. Virtual interfaces (lo, bridges, tunnels)
    have no `device` link and are left out."""
    found = []
    try:
        names = os.listdir(sys_net)
    except OSError:
        return []
    for name in names:
        device = os.path.join(sys_net, name, "device")
        if os.path.exists(device):
            # .../pci0000:00/0000:00:03.0/virtio0: the path sorts by bus, slot, function
            found.append((os.path.realpath(device), name))
    return [name for _path, name in sorted(found)]


def primary_nic_name() -> str:
    nics = nic_names()
    return nics[0] if nics else "eth0"


def primary_mac() -> str:
    """The first NIC's MAC, else the first non-loopback interface's (on a host), else ''."""
    nics = nic_names()
    if nics:
        return interface_mac(nics[0])
    names = interface_names()
    for name in names:
        mac = interface_mac(name)
        if name != "lo" and mac and mac != "00:00:00:00:00:00":
            return mac
    return ""


def ipv4_addresses() -> dict[str, list[str]]:
    """{ifname: ['10.0.2.15/24', ...]} from `ip -o -4 addr` (busybox and iproute2 agree on it)."""
    try:
        out = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True,
                             timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    result: dict[str, list[str]] = {}
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 4 and "inet" in fields:
            name = fields[1].rstrip(":").split("@")[0]
            result.setdefault(name, []).append(fields[fields.index("inet") + 1])
    return result


def interfaces() -> list[dict]:
    addrs = ipv4_addresses()
    out = []
    for name in interface_names():
        try:
            flags = int(_read(f"/sys/class/net/{name}/flags", "0"), 16)
        except ValueError:
            flags = 0
        out.append({"name": name, "mac": interface_mac(name), "ipv4": addrs.get(name, []),
                    "up": bool(flags & 0x1)})  # IFF_UP
    return out


def os_description() -> str:
    """What vmlab's image wrote in OS_FILE, else (an image vmlab did not build, such as a
    cloud image) the distribution's own name from os-release, with kernel and python."""
    text = _read(OS_FILE)
    if text:
        return text
    u = os.uname()
    name = u.sysname
    for line in _read("/etc/os-release").splitlines():
        if line.startswith("PRETTY_NAME="):
            name = line.split("=", 1)[1].strip().strip('"') or name
    return f"{name} (kernel {u.release}, python {sys.version.split()[0]})"


def uptime_s() -> float:
    try:
        return float(_read("/proc/uptime", "0").split()[0])
    except (ValueError, IndexError):
        return time.monotonic()


# ---------------------------------------------------------------- running commands

class RunResult:
    def __init__(self, exit_code: int, stdout: bytes, stderr: bytes, timed_out: bool, duration_s: float):
        self.exit_code, self.stdout, self.stderr = exit_code, stdout, stderr
        self.timed_out, self.duration_s = timed_out, duration_s

    def to_json(self) -> dict:
        return {
            "exit_code": self.exit_code,
            "stdout_b64": base64.b64encode(self.stdout).decode("ascii"),
            "stderr_b64": base64.b64encode(self.stderr).decode("ascii"),
            "timed_out": self.timed_out,
            "duration_s": round(self.duration_s, 6),
        }


def run_command(argv: list[str], *, timeout_s: float, stdin: bytes | None = None,
                env: dict[str, str] | None = None, cwd: str | None = None) -> RunResult:
    """Run argv in its own session; on timeout SIGKILL its whole process group.

    Output is collected with a selector (not communicate()) so that what was written before a
    timeout is kept, and so that a grandchild that escaped the group and holds the pipes open
    cannot block us for longer than EXEC_DRAIN_GRACE_S.
    """
    start = time.monotonic()
    try:
        proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=cwd,
            start_new_session=True)
    except FileNotFoundError as err:
        return RunResult(127, b"", f"{err}\n".encode(), False, time.monotonic() - start)
    except (PermissionError, NotADirectoryError, OSError) as err:
        code = 126 if isinstance(err, PermissionError) else 127
        return RunResult(code, b"", f"{err}\n".encode(), False, time.monotonic() - start)

    out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
    chunks: dict[int, list[bytes]] = {out_fd: [], err_fd: []}
    sel = selectors.DefaultSelector()
    for f in (proc.stdout, proc.stderr):
        os.set_blocking(f.fileno(), False)
        sel.register(f.fileno(), selectors.EVENT_READ)
    pending_in = memoryview(stdin or b"")
    in_fd = proc.stdin.fileno() if stdin else -1
    if stdin:
        os.set_blocking(in_fd, False)
        sel.register(in_fd, selectors.EVENT_WRITE)
    deadline = start + timeout_s
    timed_out = False
    open_fds = set(chunks)
    try:
        while open_fds:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if timed_out:
                    break  # grace period over: something outside the group holds the pipes
                timed_out = True
                _kill_group(proc)
                deadline = time.monotonic() + EXEC_DRAIN_GRACE_S
                continue
            for key, _ in sel.select(remaining):
                fd = key.fd
                if fd == in_fd:
                    try:
                        n = os.write(fd, pending_in[:65536])
                    except BrokenPipeError:
                        n = len(pending_in)
                    pending_in = pending_in[n:]
                    if not pending_in:
                        sel.unregister(fd)
                        proc.stdin.close()
                    continue
                data = os.read(fd, 1 << 16)
                if data:
                    chunks[fd].append(data)
                else:
                    sel.unregister(fd)
                    open_fds.discard(fd)
        # The pipes are closed (or abandoned); reap the child, killing it if it lingers.
        remaining = max(0.0, deadline - time.monotonic())
        try:
            proc.wait(timeout=remaining if not timed_out else EXEC_DRAIN_GRACE_S)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
            proc.wait()
    finally:
        sel.close()
        for f in (proc.stdin, proc.stdout, proc.stderr):
            if f is not None and not f.closed:
                f.close()
    exit_code = -9 if timed_out else proc.returncode
    return RunResult(exit_code, b"".join(chunks[out_fd]), b"".join(chunks[err_fd]), timed_out,
                     time.monotonic() - start)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


#: The busybox vmlab installs next to the agent in images that may lack one (cloud images).
OWN_BUSYBOX = "/vmlab/bin/busybox"


def busybox_applet(name: str) -> list[str] | None:
    """[busybox, name] with vmlab's own busybox or the system's, else [name] when it is on
    PATH, else None."""
    bb = OWN_BUSYBOX if os.access(OWN_BUSYBOX, os.X_OK) else shutil.which("busybox")
    if bb:
        return [bb, name]
    found = shutil.which(name)
    return [found] if found else None


_PING_SUMMARY = re.compile(r"(\d+) packets transmitted, (\d+) (?:packets )?received")
_PING_RTT = re.compile(r"time=([\d.]+) ms")


def parse_ping(output: str) -> tuple[int, int, list[float]]:
    """(transmitted, received, rtts_ms) from busybox or iputils ping output."""
    m = _PING_SUMMARY.search(output)
    transmitted, received = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
    rtts = [float(x) for x in _PING_RTT.findall(output)]
    return transmitted, received, rtts


# ---------------------------------------------------------------- HTTP handler

class BadRequest(Exception):
    """The request is malformed; answered with 400 and the message."""


class AgentHandler(http.server.BaseHTTPRequestHandler):
    """Serves the driver's requests on one connection that the agent dialled.

    `server` is the Agent (BaseRequestHandler only stores it). Not a socketserver: there is no
    listening socket, the agent constructs this handler on the connected socket itself.
    """

    protocol_version = "HTTP/1.1"
    server_version = f"vmlab-agent/{AGENT_VERSION}"
    sys_version = ""

    def parse_request(self) -> bool:
        ok = super().parse_request()
        if not getattr(self, "_seen_request", False):
            self._seen_request = True
            self.server.connection_busy(self)
        return ok

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (stdlib signature)
        pass  # one console line per request would drown the console

    def log_error(self, format: str, *args) -> None:  # noqa: A002
        self.server.log_error(format % args)

    # -- plumbing

    def _send_json(self, code: int, obj: dict) -> None:
        body = json.dumps(obj, separators=(",", ":")).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def _read_json(self) -> dict:
        length = self.headers.get("Content-Length")
        if length is None:
            if self.headers.get("Transfer-Encoding"):
                self.close_connection = True
                raise BadRequest("chunked bodies are not supported; send Content-Length")
            return {}
        try:
            n = int(length)
        except ValueError:
            self.close_connection = True
            raise BadRequest(f"bad Content-Length {length!r}") from None
        raw = self.rfile.read(n) if n else b""
        if len(raw) != n:
            self.close_connection = True
            raise BadRequest("body shorter than Content-Length")
        if not raw:
            return {}
        try:
            body = json.loads(raw)
        except ValueError as err:
            raise BadRequest(f"body is not JSON: {err}") from None
        if not isinstance(body, dict):
            raise BadRequest("body must be a JSON object")
        return body

    def _dispatch(self, method: str) -> None:
        routes = {
            ("GET", "/status"): self.do_status,
            ("POST", "/exec"): self.do_exec,
            ("POST", "/ping"): self.do_ping,
            ("POST", "/http_get"): self.do_http_get,
            ("POST", "/files/put"): self.do_files_put,
            ("POST", "/files/get"): self.do_files_get,
        }
        path = urllib.parse.urlsplit(self.path).path
        handler = routes.get((method, path))
        try:
            body = self._read_json() if method == "POST" or self.headers.get("Content-Length") else {}
            if handler is None:
                known = sorted(p for m, p in routes if p == path)
                if known:
                    self._send_json(405, {"error": f"{method} not allowed on {path}"})
                else:
                    self._send_json(404, {"error": f"no endpoint {path}; have "
                                                   + ", ".join(f"{m} {p}" for m, p in routes)})
                return
            self._send_json(200, handler(body))
        except BadRequest as err:
            self._send_json(400, {"error": str(err)})
        except (BrokenPipeError, ConnectionError):
            raise
        except Exception as err:  # the driver gets the failure; the agent keeps serving
            log(f"internal error on {method} {path}: {type(err).__name__}: {err}")
            self._send_json(500, {"error": f"{type(err).__name__}: {err}"})

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    # -- endpoints

    def do_status(self, body: dict) -> dict:
        return {
            "hostname": socket.gethostname(),
            "version": AGENT_VERSION,
            "uptime_s": uptime_s(),
            "os": os_description(),
            "interfaces": interfaces(),
            "time": time.time(),
            # monotonic marks of the way from host config to the first driver connection,
            # for finding where a restore spends its time
            "marks": dict(MARKS),
        }

    def do_exec(self, body: dict) -> dict:
        argv, shell = body.get("argv"), body.get("shell")
        if (argv is None) == (shell is None):
            raise BadRequest('give exactly one of "argv" (list of strings) or "shell" (string)')
        if argv is not None:
            if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
                raise BadRequest('"argv" must be a non-empty list of strings')
        else:
            if not isinstance(shell, str):
                raise BadRequest('"shell" must be a string')
            argv = ["/bin/sh", "-c", shell]
        timeout_s = _number(body, "timeout_s", EXEC_DEFAULT_TIMEOUT_S)
        stdin = None
        if body.get("stdin_b64") is not None:
            try:
                stdin = base64.b64decode(body["stdin_b64"], validate=True)
            except (ValueError, TypeError) as err:
                raise BadRequest(f'"stdin_b64" is not base64: {err}') from None
        env = None
        if body.get("env") is not None:
            extra = body["env"]
            if not isinstance(extra, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                      for k, v in extra.items()):
                raise BadRequest('"env" must map strings to strings')
            env = {**os.environ, **extra}
        cwd = body.get("cwd")
        if cwd is not None and not isinstance(cwd, str):
            raise BadRequest('"cwd" must be a string')
        return run_command(argv, timeout_s=timeout_s, stdin=stdin, env=env, cwd=cwd).to_json()

    def do_ping(self, body: dict) -> dict:
        address = body.get("address")
        if not isinstance(address, str) or not address or address.startswith("-"):
            raise BadRequest('"address" must be a host name or IP address')
        count = body.get("count", 3)
        if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= 1000:
            raise BadRequest('"count" must be an integer from 1 to 1000')
        timeout_s = _number(body, "timeout_s", 5.0)
        # 0.2 s between echoes instead of ping's 1 s: a test waits for the answer, and the
        # simulated network has nothing to protect from a brisker rate.
        interval_s = _number(body, "interval_s", 0.2)
        if not 0.01 <= interval_s <= 60:
            raise BadRequest('"interval_s" must be between 0.01 and 60')
        ping = busybox_applet("ping")
        if ping is None:
            raise RuntimeError("no busybox and no ping on PATH")
        # busybox: -W is the wait for a reply after the last packet, -w the overall deadline.
        deadline = max(1, int(timeout_s + 0.999))
        deadline = max(deadline, int(interval_s * count + 0.999))
        argv = ping + ["-c", str(count), "-i", f"{interval_s:g}", "-W", str(deadline),
                       "-w", str(deadline), address]
        result = run_command(argv, timeout_s=deadline + 2.0)
        output = (result.stdout + result.stderr).decode(errors="replace")
        transmitted, received, rtts = parse_ping(output)
        loss = 1.0 if transmitted == 0 else round(1.0 - received / transmitted, 6)
        return {"address": address, "transmitted": transmitted, "received": received,
                "loss": loss, "rtts_ms": rtts, "output": output}

    def do_http_get(self, body: dict) -> dict:
        url = body.get("url")
        if not isinstance(url, str):
            raise BadRequest('"url" must be a string')
        timeout_s = _number(body, "timeout_s", 10.0)
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise BadRequest(f"only http://HOST[:PORT]/PATH URLs are supported, got {url!r}")
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        # Redirects are not followed: the test sees exactly what the server answered.
        conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout_s)
        try:
            conn.request("GET", path, headers={"User-Agent": f"vmlab-agent/{AGENT_VERSION}"})
            resp = conn.getresponse()
            data = resp.read()
            headers: dict[str, str] = {}
            for key, value in resp.getheaders():
                headers[key] = f"{headers[key]}, {value}" if key in headers else value
            return {"status": resp.status, "headers": headers,
                    "body_b64": base64.b64encode(data).decode("ascii")}
        except (OSError, http.client.HTTPException) as err:
            return {"error": f"{type(err).__name__}: {err}" if str(err) else type(err).__name__}
        finally:
            conn.close()


    def do_files_put(self, body: dict) -> dict:
        """Unpack `tar_b64` (a tar archive, base64) under the absolute directory `path`."""
        path = _guest_path(body)
        try:
            data = base64.b64decode(body.get("tar_b64") or "", validate=True)
        except (ValueError, TypeError) as err:
            raise BadRequest(f'"tar_b64" is not base64: {err}') from None
        os.makedirs(path, exist_ok=True)
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            members = tar.getmembers()
            for m in members:
                if m.name.startswith("/") or ".." in m.name.split("/"):
                    raise BadRequest(f"tar member {m.name!r} leaves {path}")
            # Names were checked above; no `filter=` (Python 3.11.2 in Debian 12 lacks it).
            tar.extractall(path, members=members)
        return {"path": path, "files": sum(m.isfile() for m in members)}

    def do_files_get(self, body: dict) -> dict:
        """A tar archive (base64) of the file or folder `path`, its top entry named "x"."""
        path = _guest_path(body)
        if not os.path.exists(path):
            raise BadRequest(f"{path} does not exist in the guest")
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            tar.add(path, arcname="x")
        return {"path": path, "is_dir": os.path.isdir(path),
                "tar_b64": base64.b64encode(buf.getvalue()).decode("ascii")}


def _guest_path(body: dict) -> str:
    path = body.get("path")
    if not isinstance(path, str) or not path.startswith("/"):
        raise BadRequest('"path" must be an absolute path in the guest')
    return os.path.normpath(path)


def _number(body: dict, key: str, default: float) -> float:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise BadRequest(f'"{key}" must be a positive number of seconds')
    return float(value)


# ---------------------------------------------------------------- host channel

HOSTCHAN_NAME = "vmlab.hostchan"
HOSTCHAN_VSOCK_PORT = 51011
HOSTCHAN_ANSWER_WAIT_S = 0.5   # one poll's wait for an answer before polling again
HOSTCHAN_RETRY_S = 0.1         # pause after "wait", or while the host side is not connected
RNDADDENTROPY = 0x40085203     # _IOW('R', 0x03, int[2]) from linux/random.h
RNDRESEEDCRNG = 0x5207         # _IO('R', 0x07)


def find_hostchan_port(name: str = HOSTCHAN_NAME) -> str | None:
    """The /dev node of the virtio-serial port called `name` (numbering follows PCI order,
    so it is looked up by name, never hard-coded)."""
    base = "/sys/class/virtio-ports"
    try:
        ports = sorted(os.listdir(base))
    except OSError:
        return None
    for port in ports:
        if _read(f"{base}/{port}/name").strip() == name and os.path.exists(f"/dev/{port}"):
            return f"/dev/{port}"
    return None


class HostChannel:
    """Guest side of the host channel (protocol in vmlab/hostchan.py): poll until the host
    answers with this node's config instead of "wait"."""

    def __init__(self, fd: int, what: str, is_socket: bool = False):
        self.fd = fd
        self.what = what
        self.is_socket = is_socket
        self.buf = b""

    @classmethod
    def open(cls) -> "HostChannel | None":
        path = find_hostchan_port()
        if path is not None:
            # Opened once, read-write: a virtio-serial port allows a single opener.
            return cls(os.open(path, os.O_RDWR | os.O_NONBLOCK), path)
        if hasattr(socket, "AF_VSOCK") and os.path.exists("/dev/vsock"):
            sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
            sock.settimeout(1.0)
            try:
                sock.connect((socket.VMADDR_CID_HOST, HOSTCHAN_VSOCK_PORT))
            except OSError:
                sock.close()
                return None
            sock.setblocking(False)
            chan = cls(sock.detach(), f"vsock:{HOSTCHAN_VSOCK_PORT}", is_socket=True)
            return chan
        return None

    def send(self, line: str) -> bool:
        try:
            os.write(self.fd, (line + "\n").encode())
            return True
        except BlockingIOError:
            return False  # the host side is not connected (virtio-serial blocks writes then)
        except OSError:
            return False

    def read_line(self, timeout_s: float) -> str | None:
        """One line from the host, or None. A bare "wait" counts as a line without its newline."""
        deadline = time.monotonic() + timeout_s
        while True:
            for sep in (b"\n",):
                if sep in self.buf:
                    line, self.buf = self.buf.split(sep, 1)
                    return line.decode(errors="replace").strip()
            if self.buf.strip() == b"wait":
                self.buf = b""
                return "wait"
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            ready, _, _ = select.select([self.fd], [], [], remaining)
            if not ready:
                continue
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                continue
            if not data:
                # virtio-serial reads EOF while the host side is disconnected: wait and retry
                time.sleep(HOSTCHAN_RETRY_S)
                continue
            self.buf += data

    def wait_for_config(self, state: dict) -> dict:
        """Poll until the host answers with a JSON config. Blocks for as long as that takes:
        a snapshot is saved while the agent waits here, and a restore resumes it."""
        announced = False
        while True:
            if not self.send("poll " + json.dumps(state, separators=(",", ":"))):
                time.sleep(HOSTCHAN_RETRY_S)
                continue
            # After "wait", keep listening instead of sleeping: the host pushes the config
            # the moment it has one (right after a restore), and select wakes on it at once.
            waits = 0
            while waits < 2:
                line = self.read_line(HOSTCHAN_ANSWER_WAIT_S)
                if line is None:
                    break
                if line == "wait":
                    waits += 1
                    if not announced:
                        log(f"host channel {self.what}: waiting for configuration")
                        announced = True
                    continue
                if line.startswith("{"):
                    try:
                        return json.loads(line)
                    except ValueError:
                        log(f"host channel: ignoring malformed config {line[:80]!r}")
                        break

    def applied(self, info: dict, timeout_s: float = 2.0) -> None:
        """Tell the host the config is in place and wait (bounded) for its "up"."""
        self.send_applied(info)
        self.wait_up(timeout_s)

    def send_applied(self, info: dict) -> None:
        self.send("applied " + json.dumps(info, separators=(",", ":")))

    def wait_up(self, timeout_s: float = 2.0) -> None:
        """Wait (bounded) for the host's "up": the NIC link is plugged in."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            line = self.read_line(deadline - time.monotonic())
            if line == "up":
                return


SIOCSIFHWADDR, SIOCSIFADDR, SIOCSIFNETMASK = 0x8924, 0x8916, 0x891C
SIOCGIFFLAGS, SIOCSIFFLAGS, SIOCADDRT, SIOCSARP = 0x8913, 0x8914, 0x890B, 0x8955
ATF_COM = 0x02
IFF_UP, RTF_UP, RTF_GATEWAY = 0x1, 0x1, 0x2
ARPHRD_ETHER = 1
_IFREQ_SIZE = 40     # struct ifreq on Linux: 16-byte name + 24-byte union
_RTENTRY_SIZE = 120  # struct rtentry on x86_64 (include/uapi/linux/route.h)


def _sockaddr_in(ip: str) -> bytes:
    return struct.pack("=HH4s8x", socket.AF_INET, 0, socket.inet_aton(ip))


def _ifreq(dev: str, payload: bytes) -> bytes:
    return (dev.encode()[:15].ljust(16, b"\0") + payload).ljust(_IFREQ_SIZE, b"\0")


def configure_nic(dev: str, mac: str | None, ip: str, mask: str, gw: str | None,
                  gw_mac: str | None = None) -> None:
    """Set `dev`'s MAC, IPv4 address and mask, bring it up, and add the default route."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        fd = sock.fileno()
        if mac:
            hw = bytes(int(x, 16) for x in mac.split(":"))
            fcntl.ioctl(fd, SIOCSIFHWADDR, _ifreq(dev, struct.pack("=H6s8x", ARPHRD_ETHER, hw)))
        fcntl.ioctl(fd, SIOCSIFADDR, _ifreq(dev, _sockaddr_in(ip)))
        fcntl.ioctl(fd, SIOCSIFNETMASK, _ifreq(dev, _sockaddr_in(mask)))
        flags = struct.unpack_from("=h", fcntl.ioctl(fd, SIOCGIFFLAGS, _ifreq(dev, b"")), 16)[0]
        fcntl.ioctl(fd, SIOCSIFFLAGS, _ifreq(dev, struct.pack("=h", flags | IFF_UP)))
        if gw and gw_mac:
            # The gateway's MAC is known: skip the ARP round trip before the first packet out.
            hw = bytes(int(x, 16) for x in gw_mac.split(":"))
            arpreq = (_sockaddr_in(gw) + struct.pack("=H6s8x", ARPHRD_ETHER, hw)
                      + struct.pack("=i", ATF_COM) + _sockaddr_in("0.0.0.0")
                      + dev.encode()[:15].ljust(16, b"\0"))
            try:
                fcntl.ioctl(fd, SIOCSARP, arpreq)
            except OSError:
                pass  # ARP will find it
        if gw:
            # struct rtentry with native alignment: pad1, dst, gateway, genmask, flags, pad2,
            # pad3, pad4, metric, dev (NULL: the kernel finds it from the gateway), mtu,
            # window, irtt.
            rt = struct.pack("@L16s16s16sHhLPhPLLH", 0, _sockaddr_in("0.0.0.0"), _sockaddr_in(gw),
                             _sockaddr_in("0.0.0.0"), RTF_UP | RTF_GATEWAY, 0, 0, 0, 0, 0, 0, 0, 0)
            try:
                fcntl.ioctl(fd, SIOCADDRT, rt.ljust(_RTENTRY_SIZE, b"\0"))
            except FileExistsError:
                pass


def configure_link(dev: str, mac: str | None) -> None:
    """Set `dev`'s MAC (before it goes up, so its IPv6 addresses derive from it) and bring it up."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        fd = sock.fileno()
        if mac:
            hw = bytes(int(x, 16) for x in mac.split(":"))
            fcntl.ioctl(fd, SIOCSIFHWADDR, _ifreq(dev, struct.pack("=H6s8x", ARPHRD_ETHER, hw)))
        flags = struct.unpack_from("=h", fcntl.ioctl(fd, SIOCGIFFLAGS, _ifreq(dev, b"")), 16)[0]
        fcntl.ioctl(fd, SIOCSIFFLAGS, _ifreq(dev, struct.pack("=h", flags | IFF_UP)))


def _mask_prefix(mask: str) -> int:
    return sum(bin(int(octet)).count("1") for octet in mask.split("."))


def apply_host_config(cfg: dict, config: "Config") -> dict:
    """Put the host's config in place: identity (hostname, clock, entropy, driver), then each
    NIC's MAC, address and route. Returns facts for the "applied" line."""
    apply_identity(cfg, config)
    return apply_network(cfg, config)


def apply_identity(cfg: dict, config: "Config") -> None:
    """Hostname, clock, entropy and the driver's address (nothing the link waits for)."""
    if cfg.get("hostname"):
        config.hostname = cfg["hostname"]
        try:
            old_name = _read("/proc/sys/kernel/hostname").strip()
            with open("/proc/sys/kernel/hostname", "w") as f:
                f.write(cfg["hostname"])
            rename_in_hosts(old_name, cfg["hostname"])
        except OSError as err:
            log(f"cannot set hostname: {err}")
    if cfg.get("time"):
        # The clock stood still while the snapshot sat on disk.
        try:
            time.clock_settime(time.CLOCK_REALTIME, float(cfg["time"]))
        except (OSError, ValueError) as err:
            log(f"cannot set the clock: {err}")
    if cfg.get("seed"):
        reseed(base64.b64decode(cfg["seed"]))
    if cfg.get("driver"):
        config.driver = parse_host_port(cfg["driver"])
    if cfg.get("driver6"):
        config.driver6 = parse_host_port(cfg["driver6"])


def rename_in_hosts(old: str, new: str, path: str = "/etc/hosts") -> None:
    """The snapshot's /etc/hosts names the snapshot: make it name this node instead."""
    try:
        lines = open(path).read().splitlines()
    except OSError:
        lines = ["127.0.0.1 localhost"]
    out = [" ".join(new if word == old else word for word in line.split()) if old else line
           for line in lines]
    if not any(new in line.split() for line in out):
        out.append(f"127.0.1.1 {new}")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


def apply_network(cfg: dict, config: "Config") -> dict:
    """Each NIC's MAC, address and route (or DHCP); returns facts for the "applied" line."""
    if cfg.get("dhcp"):
        DhcpSupervisor().start()
        return {"mode": "dhcp"}
    devices = nic_names()
    for i, nic in enumerate(cfg.get("nics") or []):
        dev = nic.get("name") or (devices[i] if i < len(devices) else f"eth{i}")
        mask = nic.get("mask") or "255.255.255.0"
        gw = nic.get("gw") if i == 0 else None
        if not nic.get("ip"):
            # An IPv6-only network: MAC and link only; the kernel's SLAAC does the rest.
            try:
                configure_link(dev, nic.get("mac"))
            except OSError as err:
                log(f"host channel: cannot bring {dev} up: {err}")
            continue
        try:
            # ioctls, not `ip`: after a restore every new process costs fresh TCG translation,
            # and this runs on the path to the agent's first connection.
            configure_nic(dev, nic.get("mac"), nic["ip"], mask, gw, nic.get("gw_mac"))
        except OSError as err:
            log(f"host channel: ioctl config of {dev} failed ({err}); using ip(8)")
            prefix = _mask_prefix(mask)
            script = [f"ip link set dev {dev} address {nic['mac']}" if nic.get("mac") else "true",
                      f"ip link set dev {dev} up", f"ip -4 addr flush dev {dev}",
                      f"ip addr add {nic['ip']}/{prefix} dev {dev}"]
            if gw:
                script.append(f"ip route replace default via {gw} dev {dev}")
            result = run_command(busybox_applet("sh") + ["-c", "; ".join(script)], timeout_s=10)
            if result.exit_code != 0:
                log(f"host channel: network config failed: {result.stderr.decode(errors='replace')}")
    if cfg.get("dns"):
        try:
            with open("/etc/resolv.conf", "w") as f:
                f.write("".join(f"nameserver {d}\n" for d in cfg["dns"]))
        except OSError as err:
            log(f"cannot write resolv.conf: {err}")
    nics = cfg.get("nics") or []
    return {"mode": "static", "macs": [interface_mac(d) for d in devices[:len(nics)]]}


def reseed(seed: bytes) -> None:
    """Mix `seed` into the kernel's pool and credit it, then force a CRNG reseed, so clones
    restored from one snapshot stop sharing their random streams."""
    try:
        fd = os.open("/dev/urandom", os.O_WRONLY)
    except OSError as err:
        log(f"cannot open /dev/urandom: {err}")
        return
    try:
        request = struct.pack("ii", len(seed) * 8, len(seed)) + seed
        try:
            fcntl.ioctl(fd, RNDADDENTROPY, request)
            fcntl.ioctl(fd, RNDRESEEDCRNG)
        except OSError:
            os.write(fd, seed)  # not root or an old kernel: mix in without credit
    finally:
        os.close(fd)


# ---------------------------------------------------------------- DHCP

class DhcpSupervisor:
    """Runs one long-lived busybox udhcpc per NIC (`nic_names`) and restarts it if it exits.

    udhcpc stays in the foreground (-f) so leases renew; it never gives up (no -n): it sends
    3 discovers 1 s apart (-t 3 -T 1), then waits 1 s (-A 1), forever. The script it runs sets the
    address and, for the first NIC only, the default route and /etc/resolv.conf, and logs the lease.
    """

    def __init__(self, script: str = UDHCPC_SCRIPT):
        self.script = script

    def start(self) -> None:
        udhcpc = busybox_applet("udhcpc")
        if udhcpc is None:
            log("dhcp: no busybox udhcpc; not configuring interfaces")
            return
        for i, name in enumerate(nic_names()):
            threading.Thread(target=self._supervise, args=(udhcpc, name, i == 0),
                             name=f"udhcpc-{name}", daemon=True).start()

    def _supervise(self, udhcpc: list[str], name: str, primary: bool) -> None:
        pidfile = f"/run/udhcpc.{name}.pid"
        _kill_stale(pidfile, "udhcpc")  # left by a previous agent that /init restarted
        ip = busybox_applet("ip") or ["ip"]
        subprocess.run(ip + ["link", "set", name, "up"], capture_output=True)
        while True:
            argv = udhcpc + ["-f", "-i", name, "-s", self.script, "-p", pidfile,
                             "-t", "3", "-T", "1", "-A", "1"]
            # The hook gives only the first NIC the default route and resolv.conf.
            env = dict(os.environ, VMLAB_PRIMARY_NIC="1" if primary else "0")
            try:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, env=env)
            except OSError as err:
                log(f"dhcp: cannot start udhcpc on {name}: {err}")
                return
            code = proc.wait()
            log(f"dhcp: udhcpc on {name} exited with code {code}; restarting")
            time.sleep(1.0)


def _kill_stale(pidfile: str, comm: str) -> None:
    try:
        pid = int(_read(pidfile, "0"))
    except ValueError:
        return
    if pid > 0 and _read(f"/proc/{pid}/comm") == comm:
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass


# ---------------------------------------------------------------- connections to the driver

class Agent:
    """Keeps IDLE_CONNECTIONS dialled, idle connections to the driver and serves each one.

    Counters, all guarded by `_cond`:
      `_idle`     connections being dialled or connected with no request yet
      `_total`    every connection that exists (dialling, idle or busy)
      `_live`     connections that are connected (idle or busy)
      `_failures` dials in a row that failed, or connections that closed before their first
                  request (a peer that is not the driver); sets the shared backoff, and is reset
                  by the first request on any connection
    """

    def __init__(self, config: Config):
        self.config = config
        self._cond = threading.Condition()
        self._idle = 0
        self._total = 0
        self._live = 0
        self._failures = 0
        self._conn_ids = 0
        self._generation = 0  # bumped by set_driver: dialers restart at once
        self._sockets: set[socket.socket] = set()
        self._last_log: dict[str, float] = {}

    # -- public

    def run_forever(self, dial_first: bool = False, after_first=None) -> None:
        """Dial and serve until the process is killed. With `dial_first`, the first
        connection is dialled on this thread before any other starts: after a restore that
        is the shortest way to the driver (a new thread is slow to get going under TCG)."""
        if dial_first:
            with self._cond:
                self._idle += 1
                self._total += 1
            sock = self._dial()
            threading.Thread(target=self._connection, args=(sock,), name="conn", daemon=True).start()
            if after_first is not None:
                after_first()
        with self._cond:
            while True:
                while self._idle < IDLE_CONNECTIONS and self._total < MAX_CONNECTIONS:
                    self._idle += 1
                    self._total += 1
                    threading.Thread(target=self._connection, name="conn", daemon=True).start()
                self._cond.wait()

    def set_driver(self, driver: tuple[str, int]) -> None:
        """Switch to a new driver address: drop every connection and dial the new one at once."""
        with self._cond:
            self.config.driver = driver
            self._generation += 1
            self._failures = 0
            sockets = list(self._sockets)
            self._cond.notify_all()
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def connection_busy(self, handler: AgentHandler) -> None:
        """Called by the handler on its connection's first request: dial a replacement."""
        with self._cond:
            self._idle -= 1
            self._failures = 0
            self._cond.notify_all()

    # -- one connection's life

    def _connection(self, sock: socket.socket | None = None) -> None:
        state = {"busy": False}
        try:
            sock = sock or self._dial()
            try:
                self._serve(sock, state)
            finally:
                with self._cond:
                    self._sockets.discard(sock)
                    self._live -= 1
                    if not state["busy"]:
                        self._failures += 1
                    if self._live == 0 and self._log_throttled(
                            "lost", "lost all connections to the driver; redialling"):
                        self._last_log.pop("connected", None)  # announce the next success
                sock.close()
        except Exception as err:  # never let a connection thread die silently
            log(f"connection error: {type(err).__name__}: {err}")
        finally:
            with self._cond:
                self._total -= 1
                if not state["busy"]:
                    self._idle -= 1
                self._cond.notify_all()

    def _backoff(self) -> None:
        """Wait BACKOFF_START_S doubling per failure up to BACKOFF_CAP_S; set_driver cuts it short."""
        with self._cond:
            if self._failures == 0:
                return
            delay = min(BACKOFF_START_S * 2 ** (self._failures - 1), BACKOFF_CAP_S)
            generation = self._generation
            self._cond.wait_for(lambda: self._generation != generation, timeout=delay)

    def _dial(self) -> socket.socket:
        while True:
            self._backoff()
            with self._cond:
                host, port = self.config.driver
                fallback = self.config.driver6
                self._conn_ids += 1
                conn_id = self._conn_ids
            try:
                mark("first_dial")
                sock = connect(host, port)
                mark("first_connected")
            except OSError as err:
                if fallback is None:
                    self._dial_failed(host, port, err)
                    continue
                # No IPv4 route (an IPv6-only node) fails at once; then try the IPv6 VIP.
                try:
                    host, port = fallback
                    sock = connect(host, port)
                except OSError as err6:
                    self._dial_failed(f"{self.config.driver[0]} or {host}", port, err6)
                    continue
            try:
                sock.settimeout(None)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                _enable_keepalive(sock)
                hello = {"mac": primary_mac(), "hostname": self.config.hostname,
                         "version": AGENT_VERSION, "conn_id": conn_id,
                         "instance": INSTANCE}
                sock.sendall((HELLO_PREFIX + json.dumps(hello, separators=(",", ":")) + "\n").encode())
            except OSError as err:
                sock.close()
                self._dial_failed(host, port, err)
                continue
            with self._cond:
                self._sockets.add(sock)
                self._live += 1
                if self._live == 1:
                    self._log_throttled("connected", f"connected to driver {host}:{port}")
            return sock

    def _dial_failed(self, host: str, port: int, err: OSError) -> None:
        with self._cond:
            self._failures += 1
            if self._log_throttled("failure", f"cannot reach driver {host}:{port}: {err.strerror or err}; retrying"):
                self._last_log.pop("connected", None)  # announce the next success

    def _serve(self, sock: socket.socket, state: dict) -> None:
        agent = self

        class _Context:
            # What the handler calls back; records that this connection became busy.
            def connection_busy(self, handler: AgentHandler) -> None:
                state["busy"] = True
                agent.connection_busy(handler)

            def log_error(self, message: str) -> None:
                with agent._cond:
                    agent._log_throttled("http", f"http: {message}")

        try:
            AgentHandler(sock, self.config.driver, _Context())
        except (ConnectionError, OSError):
            pass  # the driver went away; the finally in _connection accounts for it

    def _log_throttled(self, kind: str, message: str) -> bool:
        """Log unless a line of the same kind went out in the last FAILURE_LOG_INTERVAL_S.

        Called with `_cond` held. Returns whether the line was logged.
        """
        now = time.monotonic()
        last = self._last_log.get(kind)
        if last is not None and now - last < FAILURE_LOG_INTERVAL_S:
            return False
        self._last_log[kind] = now
        log(message)
        return True


def connect(host: str, port: int) -> socket.socket:
    """A TCP connection to host:port. A literal address skips getaddrinfo: its first call in a
    process loads the NSS modules, which after a snapshot restore costs a fifth of a second of
    fresh TCG translation on the way to the driver."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
        except OSError:
            continue
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(CONNECT_TIMEOUT_S)
        try:
            sock.connect((host, port))
        except BaseException:
            sock.close()
            raise
        return sock
    return socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S)


def _enable_keepalive(sock: socket.socket) -> None:
    """Notice a driver that vanished without a FIN (e.g. the host side of a restored snapshot)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


def main(argv: list[str] | None = None) -> int:
    config = Config.from_args(argv)
    log(f"version {AGENT_VERSION} starting as {config.hostname!r}, "
        f"driver {config.driver[0]}:{config.driver[1]}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    chan = HostChannel.open() if config.dhcp else None
    configured = None
    if chan is not None:
        cfg = chan.wait_for_config({"state": "waiting", "hostname": config.hostname,
                                    "version": AGENT_VERSION})
        t0 = time.monotonic()
        mark("config_received")
        info = apply_network(cfg, config)
        mark("network_applied")
        info["apply_s"] = round(time.monotonic() - t0, 4)
        chan.send_applied(info)  # the host plugs the cable while the rest is set up
        apply_identity(cfg, config)
        mark("identity_applied")
        chan.wait_up()
        mark("link_up")
        info["applied_to_up_s"] = round(time.monotonic() - t0 - info["apply_s"], 4)
        nics = cfg.get("nics") or []
        if nics:
            configured = (f"host channel: {nics[0].get('name') or primary_nic_name()} set to {nics[0]['ip']} "
                          f"mac {nics[0].get('mac')} via {nics[0].get('gw')} (applied in "
                          f"{info['apply_s']:.3f} s, link up after {info['applied_to_up_s']:.3f} s)")
        if cfg.get("agent") is False:
            # A no_agent node: its address is set; it runs nothing of ours from here on. The
            # process stays (a service manager would restart it and it would poll again).
            log("no_agent node: configured, not dialling the driver")
            while True:
                time.sleep(3600)
    elif config.dhcp:
        DhcpSupervisor().start()
    # Console output wakes the screen writer, which costs fresh TCG translation after a
    # restore: say what was configured only once the first connection is up.
    Agent(config).run_forever(dial_first=chan is not None,
                              after_first=(lambda: log(configured)) if configured else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
