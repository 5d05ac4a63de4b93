"""DeepSpeed hostfiles: parse, and check one against a recipe and a DeepSpeed JSON before a launch.

    python -m ds_widenet.hostfile check HOSTFILE --deepspeed_config C.json --recipe R.yaml [key=value ...]

A hostfile (DeepSpeed's and Open MPI's format) lists one node per line, `hostname slots=N` with N the
GPUs (processes) on that node; `#` starts a comment, blank lines are skipped. The check reads it the
way `deepspeed --hostfile` does (world size = sum of slots, ranks numbered node by node in file
order), runs the same validation the training entry point runs for that world size (ep_size against
experts and world, micro x grad_accum x world = global batch, ZeRO-3 with MoE, ...), and refuses an
ep_size that does not fit inside a node: DeepSpeed forms expert-parallel groups from consecutive
ranks, so every node's slots must be a multiple of ep_size or a group spans two nodes and the MoE
all-to-all (at EVERY depth in WideNet) leaves NVLink for the network. Prints a summary and exits 0,
or prints `error: ...` (one line naming the fix) and exits 2.

Names are checked too, since a multi-host launch needs every host to reach every other by the name
the hostfile gives: a listed host (other than this one) whose name resolves to a loopback address
here is a warning. `--probe` asks each host over ssh (as pdsh will log in) how it resolves the
others' names, and warns for each name that resolves to loopback there (its ranks would connect
to themselves: a stale /etc/hosts line) or does not resolve, and for each host ssh cannot reach.
A host's own name resolving to 127.0.1.1, as Debian writes /etc/hosts, is not flagged: the trainer
routes gloo by the address that reaches MASTER_ADDR, and DeepSpeed takes MASTER_ADDR from
`hostname -I`, so that line is harmless.
"""
from __future__ import annotations

import argparse
import ipaddress
import re
import shlex
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from .config import BatchLayout, ConfigError, Recipe, load_ds_config, load_recipe, validate

FORMAT = "`hostname slots=N` (N = GPUs on that node), e.g. `node1 slots=8`"

# DeepSpeed's own pattern is r'^(\S+)\s+slots=(\d+)' (and it ignores whatever follows); this one is stricter.
_LINE = re.compile(r"^(?P<host>[^\s#=]+)\s+slots=(?P<slots>-?\d+)(?P<rest>.*)$")


@dataclass(frozen=True)
class Host:
    name: str
    slots: int
    line: int  # 1-based line number in the file


def parse_hostfile(text: str, source: str = "hostfile") -> list[Host]:
    """Hosts in file order. Raises ConfigError (one line: `source:line: what, the fix`) on a malformed
    line, a duplicate host, slots <= 0, or a file without hosts."""
    hosts: list[Host] = []
    seen: dict[str, int] = {}
    for n, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        where = f"{source}:{n}"
        if not m:
            tokens = line.split("#", 1)[0].split()
            if len(tokens) == 1 and "=" not in tokens[0] and ":" not in tokens[0]:
                raise ConfigError(f"{where}: {tokens[0]!r} has no slots: write `{tokens[0]} slots=8` "
                                  "(slots = GPUs on that node)")
            if len(tokens) == 1 and ":" in tokens[0]:
                host = tokens[0].split(":", 1)[0]
                raise ConfigError(f"{where}: {tokens[0]!r} is MPICH's host:N form: write `{host} slots=N` "
                                  "(slots = GPUs on that node)")
            raise ConfigError(f"{where}: malformed line {line!r}: each line is {FORMAT}")
        host, slots, rest = m.group("host"), int(m.group("slots")), m.group("rest").strip()
        if rest and not rest.startswith("#"):
            raise ConfigError(f"{where}: unexpected {rest!r} after slots={m.group('slots')}: DeepSpeed reads only "
                              f"`{host} slots=N` and would ignore it; remove it (comments start with #)")
        if slots <= 0:
            raise ConfigError(f"{where}: {host} has slots={slots}: slots must be >= 1 (the GPUs on that node); "
                              "remove the line to leave the node out")
        if host in seen:
            raise ConfigError(f"{where}: host {host} is already listed on line {seen[host]}: list each host once, "
                              "with all its GPUs in one slots=N")
        seen[host] = n
        hosts.append(Host(host, slots, n))
    if not hosts:
        raise ConfigError(f"{source} lists no hosts: add one line per node, {FORMAT}")
    return hosts


def read_hostfile(path: Union[str, Path]) -> list[Host]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"hostfile {p} not found: pass an existing file (examples in hostfiles/)")
    return parse_hostfile(p.read_text(), str(p))


def check_ep_placement(hosts: list[Host], ep_size: int) -> Optional[str]:
    """None if every expert-parallel group (ep_size consecutive ranks) stays inside one node, else
    the one-line reason and fix."""
    if ep_size <= 1:
        return None
    for h in hosts:
        if h.slots % ep_size == 0:
            continue
        divisors = [d for d in range(1, ep_size) if all(x.slots % d == 0 for x in hosts) and ep_size % d == 0]
        fit = max(divisors) if divisors else 1
        if ep_size > h.slots:
            return (f"parallel.ep_size={ep_size} is larger than {h.name}'s {h.slots} slots (line {h.line}): an "
                    f"expert-parallel group would span nodes and its all-to-all (at every depth) leave NVLink; "
                    f"set parallel.ep_size={fit} (it must divide every node's slots)")
        return (f"{h.name} has {h.slots} slots (line {h.line}), not a multiple of parallel.ep_size={ep_size}: an "
                f"expert-parallel group would straddle two nodes; give every node a multiple of {ep_size} slots "
                f"or set parallel.ep_size={fit}")
    return None


def _ipv4(name: str) -> list[str]:
    try:
        return sorted({a[4][0] for a in socket.getaddrinfo(name, None, socket.AF_INET)})
    except OSError:
        return []


def _is_loopback(addr: str) -> bool:
    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return False


def loopback_warnings(hosts: list[Host], here: Optional[str] = None) -> list[str]:
    """Warnings for listed hosts (other than this one) whose names resolve to loopback on this host;
    none for a single-host file, where loopback is what the launch uses."""
    if len(hosts) < 2:
        return []
    here = here or socket.gethostname()
    out = []
    for h in hosts:
        loop = [a for a in _ipv4(h.name) if _is_loopback(a)]
        if h.name != here and loop:
            out.append(f"{h.name} (line {h.line}) resolves to {loop[0]} (loopback) on {here}: ranks here would "
                       f"connect to themselves, not to {h.name}; list it by a name that resolves to its network "
                       "address (fix /etc/hosts or DNS), or by its IP address")
    return out


# run on each host over ssh: for every name, the name then its first IPv4 address (none: unresolved)
_PROBE = 'for h in {names}; do a=$(getent ahostsv4 "$h" | head -n 1 | cut -d" " -f1); echo "$h ${{a}}"; done'


def probe_warnings(hosts: list[Host], ssh: Optional[list[str]] = None, timeout_s: float = 20) -> list[str]:
    """Ask every host over ssh how it resolves the other hosts' names (see the module doc)."""
    ssh = ssh or ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5"]
    names = " ".join(shlex.quote(h.name) for h in hosts)
    out = []
    for h in hosts:
        try:
            res = subprocess.run([*ssh, h.name, _PROBE.format(names=names)], capture_output=True, text=True,
                                 timeout=timeout_s, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            res = subprocess.CompletedProcess([], 255, "", f"no answer within {timeout_s:g} s")
        if res.returncode != 0:
            why = next((ln for ln in res.stderr.splitlines() if ln.strip()), f"exit {res.returncode}")
            out.append(f"cannot ssh to {h.name} ({why.strip()[:120]}): the pdsh and openmpi launchers log in that way; "
                       "set up key authentication to every host (hostfiles/README.md)")
            continue
        seen = dict((line.split() + [""])[:2] for line in res.stdout.splitlines() if line.strip())
        for other in hosts:
            if other.name == h.name:
                continue
            addr = seen.get(other.name, "")
            if not addr:
                out.append(f"on {h.name}, {other.name} does not resolve: add it to {h.name}'s /etc/hosts or DNS, "
                           "or list hosts by IP address")
            elif _is_loopback(addr):
                out.append(f"on {h.name}, {other.name} resolves to {addr} (loopback): {h.name}'s ranks would connect "
                           f"to themselves; fix the {other.name} line of {h.name}'s /etc/hosts")
    return out


@dataclass(frozen=True)
class Summary:
    hosts: list[Host]
    recipe: Recipe
    layout: BatchLayout
    ep_size: int
    warnings: tuple[str, ...] = ()
    ep_spans_nodes: bool = False

    @property
    def world(self) -> int:
        return self.layout.world

    def text(self) -> str:
        ep, world = self.ep_size, self.world
        nodes = ", ".join(f"{h.name}:{h.slots}" for h in self.hosts)
        moe = self.recipe.model.moe
        lines = [f"nodes        {len(self.hosts)} ({nodes})", f"world size   {world}"]
        if moe is not None:
            within = "SPANNING NODES" if self.ep_spans_nodes else "inside one node each"
            lines.append(f"ep groups    {world // ep} of ep_size {ep} ({within}); {moe.num_experts} experts, "
                         f"{moe.num_experts // ep} per rank; expert data-parallel degree {world // ep}")
        else:
            lines.append("ep groups    - (dense model)")
        lines.append(f"batch        micro {self.layout.micro} x grad_accum {self.layout.grad_accum} x world {world} "
                     f"= global {self.layout.global_batch}")
        return "\n".join(lines)


def check(hostfile: Union[str, Path], ds_config: Union[str, Path], recipe: Union[str, Path],
          overrides: Optional[list[str]] = None, allow_cross_node_ep: bool = False, probe: bool = False) -> Summary:
    """Parse the hostfile and validate the recipe + DeepSpeed JSON for its world size (raises
    ConfigError); check the host names here, and on every host over ssh with `probe`."""
    hosts = read_hostfile(hostfile)
    r = load_recipe(recipe, overrides or [])
    ds = load_ds_config(ds_config)
    world = sum(h.slots for h in hosts)
    layout = validate(r, ds, world)
    ep = r.parallel.ep_size
    problem = check_ep_placement(hosts, ep) if r.model.moe is not None else None
    if problem and not allow_cross_node_ep:
        raise ConfigError(problem + " (or pass --allow_cross_node_ep to launch anyway)")
    warnings = ([problem] if problem else []) + loopback_warnings(hosts) + (probe_warnings(hosts) if probe else [])
    return Summary(hosts, r, layout, ep, tuple(warnings), problem is not None)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ds_widenet.hostfile", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    # one command for now; a plain positional (not a subparser) so overrides may follow the options
    ap.add_argument("command", choices=["check"], help="check: validate a hostfile against a recipe and a DeepSpeed JSON")
    ap.add_argument("hostfile", help="DeepSpeed hostfile: one `hostname slots=N` line per node")
    ap.add_argument("--deepspeed_config", "--ds_config", dest="deepspeed_config", required=True,
                    help="DeepSpeed JSON (batch sizes, precision, ZeRO)")
    ap.add_argument("--recipe", required=True, help="YAML recipe (model, parallel.ep_size, ...)")
    ap.add_argument("--allow_cross_node_ep", action="store_true",
                    help="warn instead of refusing when an expert-parallel group would span nodes")
    ap.add_argument("--probe", action="store_true",
                    help="also ssh to every host and check how it resolves the other hosts' names")
    ap.add_argument("overrides", nargs="*", help="recipe overrides, e.g. parallel.ep_size=8")
    args = ap.parse_intermixed_args(argv)
    try:
        summary = check(args.hostfile, args.deepspeed_config, args.recipe, args.overrides, args.allow_cross_node_ep,
                        args.probe)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for w in summary.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(summary.text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
