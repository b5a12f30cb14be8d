"""DeepSpeed hostfiles: write one from a SLURM allocation, check one before launching, find this node's rank.

    python launch/hostfile.py from-slurm --slots 8 > hostfile   # "node slots=8" per node of the job
    python launch/hostfile.py check hostfile                    # every host known, slots valid; prints the world size
    python launch/hostfile.py node-rank hostfile                # this node's 0-based host line (--no_ssh --node_rank)
    python launch/hostfile.py launcher-args -- ARGS...          # refuse launcher options that choose hosts, or that
                                                                # train_deepspeed.sbatch sets

A host is *known* when it is a node of the current SLURM job (inside one) or else when its name resolves.
The deepspeed launcher itself only warns about a missing hostfile and then trains on the local node
alone, and with ``--no_ssh`` a host that never starts its launcher leaves the others waiting in
rendezvous: both are errors here, before any rank starts.
"""
from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

from cli_types import DefaultsHelpFormatter  # launch/, the script's directory

# DeepSpeed's format (deepspeed/launcher/runner.py: _parse_hostfile), but a line must hold nothing else.
_LINE = re.compile(r"^(\S+)\s+slots=(\d+)$")


def parse_hostfile(text: str, source: str = "hostfile") -> dict[str, int]:
    """{host: slots} in file order. Comments (#) and blank lines are skipped. A host name holding anything but
    printable ASCII is refused: a byte-order mark (an editor's UTF-8 "with BOM") or a zero-width space is
    invisible in a message, and DeepSpeed's launcher keeps it as part of the name it connects to."""
    if text.startswith("\ufeff"):
        raise ValueError(f"{source} starts with a UTF-8 byte-order mark, which DeepSpeed's launcher reads as part of "
                         "the first host's name: save the file without it (UTF-8 without BOM, or ASCII)")
    hosts: dict[str, int] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = _LINE.match(line)
        if not m:
            raise ValueError(f"{source}:{n}: {raw.strip()!r} is not 'HOST slots=N'")
        host, slots = m.group(1), int(m.group(2))
        if not (host.isascii() and host.isprintable()):
            odd = sorted({f"U+{ord(c):04X}" for c in host if not (c.isascii() and c.isprintable())})
            raise ValueError(f"{source}:{n}: host {host!r} holds characters a host name cannot ({', '.join(odd)}): "
                             "retype the name in plain ASCII")
        if host in hosts:
            raise ValueError(f"{source}:{n}: host {host!r} is listed twice")
        if slots < 1:
            raise ValueError(f"{source}:{n}: host {host!r} has slots={slots}; need at least 1")
        hosts[host] = slots
    if not hosts:
        raise ValueError(f"{source}: no 'HOST slots=N' lines")
    return hosts


def read_hostfile(path: str | Path) -> dict[str, int]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"hostfile {path}: no such file (the deepspeed launcher would silently train on "
                         "this node alone)")
    return parse_hostfile(path.read_text(), str(path))


def slurm_nodes() -> list[str] | None:
    """Node names of the current SLURM job, in SLURM's order; None outside a job."""
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        return None
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True)
    except OSError as e:
        raise ValueError(f"cannot expand SLURM_JOB_NODELIST={nodelist!r} with scontrol: {e}") from None
    if out.returncode != 0:  # its stderr says why (the controller unreachable, a malformed list, ...)
        said = out.stderr.strip() or "(nothing on stderr)"
        raise ValueError(f"cannot expand SLURM_JOB_NODELIST={nodelist!r}: scontrol show hostnames exited "
                         f"{out.returncode}: {said}")
    return out.stdout.split()


def unknown_hosts(hosts, allocation: list[str] | None) -> list[str]:
    """Hosts outside the SLURM allocation, or (outside SLURM) hosts whose names do not resolve."""
    if allocation is not None:
        return [h for h in hosts if h not in allocation]
    bad = []
    for h in hosts:
        try:
            socket.getaddrinfo(h, None)
        except socket.gaierror:
            bad.append(h)
    return bad


def check(hosts: dict[str, int], allocation: list[str] | None, source: str = "hostfile",
          all_nodes: bool = False) -> None:
    """Every host must be a node of the SLURM job (or resolve, outside SLURM); with `all_nodes`, every node
    of the job must be listed too (train_deepspeed.sbatch starts the launcher on every node)."""
    bad = unknown_hosts(hosts, allocation)
    if bad:
        where = (f"not nodes of SLURM job {os.environ.get('SLURM_JOB_ID', '?')} (its nodes: {', '.join(allocation)})"
                 if allocation is not None else "names that do not resolve on this machine")
        raise ValueError(f"{source}: unknown host(s) {', '.join(bad)}: {where}")
    missing = [n for n in allocation or [] if n not in hosts] if all_nodes else []
    if missing:
        raise ValueError(f"{source}: node(s) {', '.join(missing)} of SLURM job {os.environ.get('SLURM_JOB_ID', '?')} "
                         "are not listed: every node of the job starts the launcher, so list them all (or "
                         "submit with fewer --nodes)")


def node_rank(hosts: dict[str, int], me: str | None = None) -> int:
    """Index of this node in the hostfile: its SLURM node name, else its hostname (full or short)."""
    names = [me] if me else [n for n in (os.environ.get("SLURMD_NODENAME"), socket.gethostname(),
                                          socket.gethostname().split(".")[0]) if n]
    order = list(hosts)
    for n in names:
        if n in order:
            return order.index(n)
    raise ValueError(f"this node ({' / '.join(dict.fromkeys(names))}) is not in the hostfile "
                     f"({', '.join(order)})")


def check_visible_devices(slots: int, visible: str | None) -> None:
    """The deepspeed launcher started from a hostfile ignores CUDA_VISIBLE_DEVICES and gives this node's
    ranks GPUs 0..slots-1 (deepspeed/launcher/runner.py honours it only without a hostfile): where SLURM
    gave the job other GPUs of a shared node (e.g. 4-7, no device cgroup), the ranks would run on another
    job's GPUs."""
    if not visible:
        return
    devices = {d.strip() for d in visible.split(",") if d.strip()}
    if not {str(i) for i in range(slots)} <= devices:  # GPUs 0..slots-1 must be among this job's
        raise ValueError(f"CUDA_VISIBLE_DEVICES={visible} on this node, but the deepspeed launcher gives its "
                         f"{slots} rank(s) GPUs {','.join(map(str, range(slots)))} whatever it says: allocate "
                         "whole nodes (sbatch --exclusive) or use launch/slurm/train.sbatch, where each rank "
                         "takes the GPU of its local rank among those SLURM gave the job")


# DeepSpeed launcher options that train_deepspeed.sbatch sets itself, or that choose hosts and GPUs, with what to
# use instead. With --no_ssh each node's launcher reads --node_rank as an index into the hosts left after
# --include/--exclude/--num_nodes (deepspeed/launcher/runner.py, 0.19.8), while ds_node.sh counts the hostfile's
# lines: with --exclude n1, n1 started n2's ranks (world size 2 where preflight checked 4) and n2's launcher
# failed "--node_rank is not set correctly".
_PICKS_HOSTS = ("the script starts a launcher on every node of the job and numbers the nodes by the hostfile, "
                "which a choice made by the launcher would contradict: choose the nodes with sbatch (--nodes, "
                "--nodelist, --exclude) and the ranks per node with GPUS_PER_NODE or a HOSTFILE's slots=N (a node's "
                "ranks get GPUs 0..slots-1)")
_SET_BY_THE_SCRIPT = {
    "--include": _PICKS_HOSTS, "--exclude": _PICKS_HOSTS, "--num_nodes": _PICKS_HOSTS,
    "--num_gpus": _PICKS_HOSTS, "--num_accelerators": _PICKS_HOSTS,
    "--hostfile": "the script passes its own: set HOSTFILE",
    "--node_rank": "ds_node.sh passes each node's own",
    "--master_addr": "the script passes the hostfile's first host, where the launcher puts rank 0",
    "--master_port": "the script passes MASTER_PORT: set MASTER_PORT instead",
}
_SHORT_OPTIONS = {"-H": "--hostfile", "-i": "--include", "-e": "--exclude"}


def _short_option(word: str) -> tuple[str | None, bool]:
    """The option taking a value (-H, -i, -e) that a single-dash `word` gives, as argparse reads it after the
    switches it may start with (-qe n1 and -qen1 are -q -e n1), or None; and whether its value is the next word."""
    if not word.startswith("-") or word.startswith("--"):
        return None, False
    rest = word[1:]
    while len(rest) > 1 and rest[0] in "qh":  # -q, -h: switches, which argparse lets lead a cluster
        rest = rest[1:]
    option = "-" + rest[:1]
    return (option, rest == rest[:1]) if option in _SHORT_OPTIONS else (None, False)


# The deepspeed launcher's options that take a value (deepspeed/launcher/runner.py, 0.19.8), and those that do not:
# its user script is the first word that is neither an option nor such an option's value.
_VALUED_OPTIONS = ("--hostfile", "--include", "--exclude", "--num_nodes", "--num_gpus", "--num_accelerators",
                   "--master_port", "--master_addr", "--node_rank", "--launcher", "--launcher_args",
                   "--enable_each_rank_log", "--autotuning", "--bind_core_list", "--ssh_port", "--venv_script",
                   "--log_level")
_FLAG_OPTIONS = ("--help", "--module", "--no_python", "--no_local_rank", "--no_ssh", "--no_ssh_check",
                 "--force_multi", "--save_pid", "--bind_cores_to_rank", "--quiet")


def launcher_words(words: list[str]) -> list[str]:
    """The words of a deepspeed launcher command line (after ``deepspeed``) that are the launcher's own: those
    before its user script, as its parser reads them (an option's value, ``--exclude n1``, is the option's)."""
    i = 0
    while i < len(words) and words[i].startswith("-"):
        word = words[i]
        if word.startswith("--") and "=" not in word:
            named = [o for o in _VALUED_OPTIONS + _FLAG_OPTIONS if o == word] or \
                [o for o in _VALUED_OPTIONS + _FLAG_OPTIONS if o.startswith(word)]
            i += 1 + (len(named) == 1 and named[0] in _VALUED_OPTIONS)  # an ambiguous one: the launcher refuses
        else:  # --opt=V, -iVALUE, or a short option taking the next word (-H, -i, -e, -qe; -q, -h take none)
            i += 1 + _short_option(word)[1]
    return words[:i]


def check_launcher_args(args: list[str], source: str = "DS_LAUNCHER_ARGS") -> None:
    """Refuse an option of _SET_BY_THE_SCRIPT among the deepspeed launcher's `args`, in any spelling its argparse
    parser takes: --opt, --opt=V, an abbreviation (--incl), a short form (-i, -iVALUE, -qi after a switch)."""
    for word in args:
        if word.startswith("--") and len(name := word.split("=", 1)[0]) > 2:
            # argparse's allow_abbrev: the exact name, else every option it abbreviates (several: an error there)
            meant = [name] if name in _SET_BY_THE_SCRIPT else [o for o in _SET_BY_THE_SCRIPT if o.startswith(name)]
        else:
            meant = [_SHORT_OPTIONS[short]] if (short := _short_option(word)[0]) else []
        if meant:
            what = meant[0] if meant[0] == word.split("=", 1)[0] else f"{word!r} (the launcher's {' or '.join(meant)})"
            raise ValueError(f"{source}={' '.join(args)!r}: {what} is not an option to give here: "
                             f"{_SET_BY_THE_SCRIPT[meant[0]]}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                     formatter_class=DefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    common = dict(allow_abbrev=False, formatter_class=DefaultsHelpFormatter)  # not inherited by subcommands
    p = sub.add_parser("from-slurm", **common, help="print a hostfile for the current SLURM job")
    p.add_argument("--slots", type=int, required=True, help="ranks per node (GPUs per node)")
    p = sub.add_parser("check", **common, help="validate a hostfile; print its total slots (the world size)")
    p.add_argument("hostfile")
    p.add_argument("--all-nodes", action="store_true", help="inside a SLURM job: every node must be listed")
    p = sub.add_parser("first-host", **common,
                       help="print the hostfile's first host (where the deepspeed launcher puts rank 0)")
    p.add_argument("hostfile")
    p = sub.add_parser("node-rank", **common, help="print this node's 0-based position among the hostfile's host "
                                                   "lines (comments and blank lines not counted)")
    p.add_argument("hostfile")
    p.add_argument("--host", help="this node's name (default: $SLURMD_NODENAME, else the hostname)")
    p.add_argument("--check-visible-devices", action="store_true",
                   help="also refuse a CUDA_VISIBLE_DEVICES that lacks one of GPUs 0..slots-1 (ds_node.sh)")
    p.add_argument("--with-slots", action="store_true", help="print 'INDEX SLOTS': also this node's slots")
    p = sub.add_parser("launcher-args", **common,
                       help="refuse deepspeed launcher options that train_deepspeed.sbatch sets itself or that choose "
                            "hosts and GPUs (give them after --)")
    p.add_argument("args", nargs="*", help="the launcher options (DS_LAUNCHER_ARGS)")
    p.add_argument("--before-script", action="store_true",
                   help="ARGS is a whole launcher command line (ds_node.sh's): check only the words before its "
                        "script")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "from-slurm":
            nodes = slurm_nodes()
            if nodes is None:
                raise ValueError("SLURM_JOB_NODELIST is not set: from-slurm runs inside a SLURM job (sbatch/salloc)")
            if args.slots < 1:
                raise ValueError(f"--slots must be >= 1, got {args.slots}")
            print("".join(f"{n} slots={args.slots}\n" for n in nodes), end="")
        elif args.cmd == "check":
            hosts = read_hostfile(args.hostfile)
            check(hosts, slurm_nodes(), args.hostfile, all_nodes=args.all_nodes)
            print(sum(hosts.values()))
        elif args.cmd == "launcher-args" and args.before_script:
            check_launcher_args(launcher_words(args.args), source="ds_node.sh's launcher options")
        elif args.cmd == "launcher-args":
            check_launcher_args(args.args)
        elif args.cmd == "first-host":
            print(next(iter(read_hostfile(args.hostfile))))
        else:
            hosts = read_hostfile(args.hostfile)
            rank = node_rank(hosts, args.host)
            slots = list(hosts.values())[rank]
            if args.check_visible_devices:
                check_visible_devices(slots, os.environ.get("CUDA_VISIBLE_DEVICES"))
            print(f"{rank} {slots}" if args.with_slots else rank)
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
