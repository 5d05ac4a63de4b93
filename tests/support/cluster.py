"""A test cluster on one machine: hosts as Linux network namespaces, each with its own sshd.

    with Cluster.create(tmp_path, hosts=2) as c:
        c.popen(0, ["deepspeed", "--hostfile", str(c.hostfile(slots=1)), ...])

Layout (addresses used only inside namespaces this module creates, removed on exit):
* a "switch" namespace holding a Linux bridge; each host namespace has `eth0` (a veth whose peer
  sits on the bridge) with 10.N.0.(i+1)/24, and `lo`;
* each host has its own UTS namespace too, so `hostname` says `node<i>`, and `/etc/hosts` as a
  Debian install writes it (`127.0.1.1 node<i>`: its own name resolves to loopback, the trap that
  makes gloo advertise 127.0.0.1 to the other hosts) plus the other nodes' real addresses;
* an sshd per host on its eth0 address (key authentication, a key made for this cluster), and an
  ssh client config (that key, no known-hosts prompts) in every host's `/etc/ssh`: `ip netns exec`
  bind-mounts `/etc/netns/<ns>/{hosts,ssh}` over `/etc`, so pdsh's and mpirun's plain `ssh node1`
  work as on a cluster, without touching root's ~/.ssh;
* the file system (and the venv) is shared, as on a cluster with a shared home.

`Cluster.unavailable()` says why namespaces cannot be made here (not root, no `ip`, no sshd), for
a skip. Teardown kills every process left in the namespaces and deletes them, even after a failure.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

SSHD = "/usr/sbin/sshd"


def _sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(list(argv), capture_output=True, text=True, timeout=30)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({res.returncode}): {res.stderr.strip()}")
    return res


@dataclass(frozen=True)
class Node:
    index: int
    name: str  # its host name, as the hostfile lists it
    ns: str  # its network namespace
    addr: str  # eth0's address


class Cluster:
    """N hosts on one bridge; see the module docstring."""

    def __init__(self, root: Path, hosts: int = 2):
        self.root = Path(root)
        self.tag = f"dsw{os.getpid() % 100000}"
        subnet = 64 + os.getpid() % 128  # 10.<subnet>.0.0/24: distinct for concurrent test processes
        self.switch = f"{self.tag}sw"
        self.nodes = [Node(i, f"node{i}", f"{self.tag}h{i}", f"10.{subnet}.0.{i + 1}") for i in range(hosts)]
        self.key = self.root / "id_ed25519"
        self._sshd: list[subprocess.Popen] = []
        self._made: list[str] = []

    # ---------------------------------------------------------------- availability and set-up

    @staticmethod
    def unavailable() -> Optional[str]:
        """None when a cluster can be built here, else why not (for pytest.skip)."""
        if os.geteuid() != 0:
            return "network namespaces need root"
        for exe in ("ip", "ssh", "ssh-keygen", "pdsh"):
            if shutil.which(exe) is None:
                return f"{exe} not found: apt-get install iproute2 openssh-client openssh-server pdsh (.ci/run does)"
        if not Path(SSHD).exists():
            return f"{SSHD} not found: apt-get install openssh-server (.ci/run does)"
        probe = f"dswprobe{os.getpid()}"
        res = _sh("ip", "netns", "add", probe, check=False)
        if res.returncode != 0:
            return f"cannot create a network namespace: {res.stderr.strip()}"
        _sh("ip", "netns", "del", probe, check=False)
        return None

    @classmethod
    def create(cls, root: Path, hosts: int = 2) -> "Cluster":
        c = cls(root, hosts)
        try:
            c._up()
        except BaseException:
            c.down()
            raise
        return c

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def _netns(self, name: str) -> None:
        _sh("ip", "netns", "add", name)
        self._made.append(name)
        _sh("ip", "-n", name, "link", "set", "lo", "up")

    def _up(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self._netns(self.switch)
        _sh("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        _sh("ip", "-n", self.switch, "link", "set", "br0", "up")
        for n in self.nodes:
            self._netns(n.ns)
            port = f"{self.tag}p{n.index}"
            _sh("ip", "link", "add", "eth0", "netns", n.ns, "type", "veth", "peer", "name", port, "netns", self.switch)
            _sh("ip", "-n", self.switch, "link", "set", port, "master", "br0")
            _sh("ip", "-n", self.switch, "link", "set", port, "up")
            _sh("ip", "-n", n.ns, "addr", "add", f"{n.addr}/24", "dev", "eth0")
            _sh("ip", "-n", n.ns, "link", "set", "eth0", "up")
        self._ssh_setup()
        for n in self.nodes:
            self._start_sshd(n)
        for n in self.nodes:
            self.wait_ssh(n.index)

    def _ssh_setup(self) -> None:
        if not self.key.exists():
            _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key))
        (self.root / "authorized_keys").write_text(Path(f"{self.key}.pub").read_text())
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege-separation directory
        for n in self.nodes:
            etc = Path("/etc/netns") / n.ns
            (etc / "ssh").mkdir(parents=True, exist_ok=True)
            hosts = ["127.0.0.1 localhost", f"127.0.1.1 {n.name}"]  # as Debian's installer writes it
            hosts += [f"{m.addr} {m.name}" for m in self.nodes if m is not n]
            (etc / "hosts").write_text("\n".join(hosts) + "\n")
            (etc / "ssh" / "ssh_config").write_text(
                "Host *\n"
                f"  IdentityFile {self.key}\n"
                "  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n"
                "  BatchMode yes\n  ConnectTimeout 5\n  ServerAliveInterval 5\n  ServerAliveCountMax 2\n")
            hostkey = self.root / f"{n.name}_host_key"
            if not hostkey.exists():
                _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(hostkey))
            (self.root / f"{n.name}_sshd_config").write_text(
                f"ListenAddress 0.0.0.0\nPort 22\nHostKey {hostkey}\n"
                f"AuthorizedKeysFile {self.root / 'authorized_keys'}\n"
                "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
                "UsePAM no\nStrictModes no\nPrintMotd no\n"
                f"PidFile {self.root / (n.name + '_sshd.pid')}\n")

    def _start_sshd(self, n: Node) -> None:
        log = open(self.root / f"{n.name}_sshd.log", "a")
        self._sshd.append(self.popen(n.index, [SSHD, "-D", "-e", "-f", str(self.root / f"{n.name}_sshd_config")],
                                     stdout=log, stderr=subprocess.STDOUT))

    def wait_ssh(self, i: int, timeout: float = 20.0) -> None:
        n = self.nodes[i]
        deadline = time.monotonic() + timeout
        while True:
            # from a host namespace: only there is the address routed
            if self.run(0, ["ssh", n.name, "true"], timeout=15).returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"sshd on {n.name} ({n.addr}) did not answer within {timeout:.0f}s")
            time.sleep(0.2)

    # ---------------------------------------------------------------- running things on a host

    def wrap(self, i: int, argv: Sequence[str]) -> list[str]:
        """argv run on host i: its network namespace, its host name (a UTS namespace of its own)."""
        n = self.nodes[i]
        return ["ip", "netns", "exec", n.ns, "unshare", "--uts", "sh", "-c",
                f'hostname {n.name} && exec "$@"', "sh", *argv]

    def popen(self, i: int, argv: Sequence[str], env: Optional[Mapping[str, str]] = None,
              cwd: Optional[Path] = None, **kw) -> subprocess.Popen:
        kw.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.Popen(self.wrap(i, argv), env=None if env is None else dict(env), cwd=cwd,
                                start_new_session=True, **kw)

    def run(self, i: int, argv: Sequence[str], env: Optional[Mapping[str, str]] = None,
            cwd: Optional[Path] = None, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(self.wrap(i, argv), env=None if env is None else dict(env), cwd=cwd,
                              capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def hostfile(self, slots: int, hosts: Optional[Sequence[int]] = None, name: str = "hostfile") -> Path:
        p = self.root / name
        p.write_text("".join(f"{self.nodes[i].name} slots={slots}\n" for i in (hosts or range(len(self.nodes)))))
        return p

    def pids(self, i: int) -> list[int]:
        out = _sh("ip", "netns", "pids", self.nodes[i].ns, check=False).stdout.split()
        return [int(p) for p in out]

    def kill_host(self, i: int, keep_sshd: bool = False) -> list[int]:
        """SIGKILL every process on host i (as a node that loses power); its sshd too unless asked."""
        keep = {p.pid for p in self._sshd} if keep_sshd else set()
        killed = []
        for pid in self.pids(i):
            if keep_sshd and (pid in keep or self._is_sshd(pid)):
                continue
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
        return killed

    @staticmethod
    def _is_sshd(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].endswith(b"sshd")
        except OSError:
            return False

    def set_link(self, i: int, up: bool) -> None:
        """eth0 of host i up or down (a cable pulled: the host lives on, unreachable)."""
        _sh("ip", "-n", self.nodes[i].ns, "link", "set", "eth0", "up" if up else "down")

    def add_dead_interface(self, i: int, name: str = "eth1", addr: str = "192.0.2.1/24") -> None:
        """A second interface on host i with an address nothing routes to (a management or storage
        NIC): a veth, up, whose other end sits alone in a namespace of its own."""
        dead = f"{self.tag}x{i}"
        self._netns(dead)
        _sh("ip", "link", "add", name, "netns", self.nodes[i].ns, "type", "veth", "peer", "name", "eth0", "netns", dead)
        _sh("ip", "-n", dead, "link", "set", "eth0", "up")
        _sh("ip", "-n", self.nodes[i].ns, "addr", "add", addr, "dev", name)
        _sh("ip", "-n", self.nodes[i].ns, "link", "set", name, "up")

    def mount_local(self, i: int, disk: Path, at: Path) -> None:
        """Host i's own directory `disk` mounted over `at`, as a node-local disk: what an ssh session
        on host i (the mount namespace its sshd got from `ip netns exec`) sees under `at`. The other
        hosts, and this process, still see the shared `at`."""
        _sh("nsenter", "--target", str(self._sshd[i].pid), "--mount", "mount", "--bind", str(disk), str(at))

    # ---------------------------------------------------------------- teardown

    def down(self) -> None:
        """Kill everything in the namespaces, delete them and their /etc/netns files."""
        for ns in self._made:
            for _ in range(3):
                pids = _sh("ip", "netns", "pids", ns, check=False).stdout.split()
                if not pids:
                    break
                for pid in pids:
                    try:
                        os.kill(int(pid), signal.SIGKILL)
                    except (ProcessLookupError, ValueError):
                        pass
                time.sleep(0.2)
        for p in self._sshd:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        for ns in reversed(self._made):
            _sh("ip", "netns", "del", ns, check=False)
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)
        self._made.clear()
        self._sshd.clear()
