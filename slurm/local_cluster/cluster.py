#!/usr/bin/env python3
"""A real SLURM cluster on this machine, for the tests and for trying the launcher without a cluster.

    sudo python3 slurm/local_cluster/cluster.py start            # one node: this machine's CPUs and memory
    sudo python3 slurm/local_cluster/cluster.py start --nodes 2  # two nodes, each in its own network namespace
    sudo python3 slurm/local_cluster/cluster.py status
    sudo python3 slurm/local_cluster/cluster.py stop

``start`` is idempotent: it installs Debian's ``slurm-wlm`` and ``munge`` when missing, writes
``/etc/slurm/slurm.conf`` (marked as ours; a slurm.conf someone else wrote is never overwritten), starts munged,
slurmctld and slurmd as root, and waits until every node is idle. Run again with another ``--nodes`` it switches
mode (the daemons restart; queued jobs survive in the state folder).

Two nodes on one machine: a bridge in the root network namespace holds slurmctld's address; each node is a
network namespace joined to it by a veth pair, with its own address and, through a UTS namespace, its own
hostname, so a job's tasks on ``node1`` and ``node2`` talk over a real (virtual) network. slurmd is started with
``nsenter --net`` + ``unshare --uts``, not ``ip netns exec``: the latter remounts /sys and slurmd then finds no
cgroup filesystem.

Standard library only: it runs before any virtual environment exists.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

CONF = Path(os.environ.get("MMFUSE_SLURM_CONF", "/etc/slurm/slurm.conf"))
MARK = "# Written by mmfuse slurm/local_cluster/cluster.py"
STATE = Path("/var/spool/mmfuse-slurm")
LOGS = Path("/var/log/mmfuse-slurm")
RUN = Path("/run/mmfuse-slurm")
PARTITION = "local"

# Two-node mode: one bridge, one namespace per node. 10.77.0.0/24 is private and unlikely to be in use.
BRIDGE, BRIDGE_ADDR, PREFIX = "mmfbr0", "10.77.0.1", 24
NODES = {"node1": ("mmf-node1", "mmfv1", "10.77.0.11"), "node2": ("mmf-node2", "mmfv2", "10.77.0.12")}
HOSTS = Path("/etc/hosts")
HOSTS_BEGIN, HOSTS_END = "# mmfuse local_cluster begin", "# mmfuse local_cluster end"


class ClusterError(RuntimeError):
    pass


def sh(*cmd: str, check: bool = True, quiet: bool = False, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if check and result.returncode != 0:
        raise ClusterError(f"{' '.join(cmd)} failed ({result.returncode}): {(result.stderr or result.stdout).strip()}")
    if not quiet and result.stdout.strip():
        print(result.stdout.strip())
    return result


def hostname() -> str:
    return socket.gethostname().split(".")[0]


# ---- install ----
def install() -> None:
    if all(shutil.which(tool) for tool in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    print("installing slurm-wlm and munge with apt-get ...", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = ("apt-get", "install", "-y", "-q", "--no-install-recommends", "slurm-wlm", "munge")
    if subprocess.run(command, env=env, capture_output=True).returncode != 0:
        sh("apt-get", "update", "-q", env=env, quiet=True)
        sh(*command, env=env, quiet=True)


# ---- munge ----
def start_munge() -> None:
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        key.write_bytes(os.urandom(128))
    shutil.chown(key, "munge", "munge")
    key.chmod(0o400)
    run_dir = Path("/run/munge")
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.chown(run_dir, "munge", "munge")
    if _munge_works():
        return
    sh("runuser", "-u", "munge", "--", "munged", "--force", quiet=True)
    _wait(_munge_works, 20, "munged did not start (see /var/log/munge/munged.log)")


def _munge_works() -> bool:
    if not shutil.which("munge"):
        return False
    cred = subprocess.run(["munge", "-n"], capture_output=True)
    return cred.returncode == 0 and subprocess.run(["unmunge"], input=cred.stdout, capture_output=True).returncode == 0


# ---- slurm.conf ----
def real_memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(int(line.split()[1]) / 1024 * 0.9)  # slurmd drains a node that reports less than this
    raise ClusterError("cannot read MemTotal from /proc/meminfo")


def render_conf(nodes: int) -> str:
    cpus, memory = os.cpu_count() or 1, real_memory_mb()
    host = hostname()
    if nodes == 1:
        controller = f"{host}(127.0.0.1)"
        node_lines = [f"NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory} State=UNKNOWN"]
        names = host
    else:
        controller = f"{host}({BRIDGE_ADDR})"
        # The nodes share this machine's CPUs and memory; each declares all of them.
        node_lines = [f"NodeName={name} NodeAddr={addr} CPUs={cpus} RealMemory={memory // 2} State=UNKNOWN"
                      for name, (_, _, addr) in NODES.items()]
        names = ",".join(NODES)
    return "\n".join([
        MARK + f" (mode: {nodes} node{'s' if nodes > 1 else ''}); `cluster.py stop` stops it.",
        "ClusterName=mmfuse",
        f"SlurmctldHost={controller}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"StateSaveLocation={STATE}/ctld",
        f"SlurmdSpoolDir={STATE}/%n",
        f"SlurmctldPidFile={RUN}/slurmctld.pid",
        f"SlurmdPidFile={RUN}/slurmd-%n.pid",
        f"SlurmctldLogFile={LOGS}/slurmctld.log",
        f"SlurmdLogFile={LOGS}/slurmd-%n.log",
        # No cgroups: a container or a laptop may not delegate them; processes are tracked by parentage.
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        "SchedulerType=sched/backfill",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/none",
        "MpiDefault=none",
        "SwitchType=switch/none",
        "ReturnToService=2",
        "SlurmctldTimeout=30",
        "SlurmdTimeout=60",
        # Seconds between SIGTERM and SIGKILL: time for every rank to reach a step boundary and checkpoint.
        "KillWait=60",
        "MinJobAge=900",
        "InactiveLimit=0",
        "JobRequeue=1",
        # A requeued job waits cred_expire seconds before it may start again (default 120).
        "AuthInfo=cred_expire=10",
        *node_lines,
        f"PartitionName={PARTITION} Nodes={names} Default=YES MaxTime=INFINITE State=UP",
        "",
    ])


def write_conf(text: str) -> bool:
    """Write slurm.conf; True when it changed. Refuses to replace a slurm.conf this script did not write."""
    if CONF.exists():
        current = CONF.read_text()
        if not current.startswith(MARK):
            raise ClusterError(f"{CONF} exists and was not written by this script; not touching a real cluster's "
                               "config (move it away, or set MMFUSE_SLURM_CONF to another path)")
        if current == text:
            return False
    CONF.parent.mkdir(parents=True, exist_ok=True)
    CONF.write_text(text)
    return True


def conf_nodes() -> int:
    if not CONF.exists() or not CONF.read_text().startswith(MARK):
        return 0
    return 2 if "mode: 2 nodes" in CONF.read_text().splitlines()[0] else 1


# ---- daemons ----
def _pid(path: Path) -> int | None:
    try:
        pid = int(path.read_text().split()[0])
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError, IndexError):
        return None


def _slurm_env() -> dict:
    return {**os.environ, "SLURM_CONF": str(CONF)}


def start_controller() -> None:
    if _pid(RUN / "slurmctld.pid") is None:
        sh("slurmctld", env=_slurm_env(), quiet=True)
    _wait(lambda: "UP" in sh("scontrol", "ping", check=False, quiet=True, env=_slurm_env()).stdout, 60,
          f"slurmctld did not answer (see {LOGS}/slurmctld.log)")


def start_node_daemons(nodes: int) -> None:
    if nodes == 1:
        host = hostname()
        if _pid(RUN / f"slurmd-{host}.pid") is None:
            sh("slurmd", "-N", host, env=_slurm_env(), quiet=True)
        return
    for name, (netns, _, _) in NODES.items():
        if _pid(RUN / f"slurmd-{name}.pid") is None:
            # Its own hostname (a UTS namespace) so the node's processes see "nodeN", its own network namespace.
            sh("nsenter", f"--net=/run/netns/{netns}", "unshare", "--uts", "sh", "-c",
               f"hostname {name} && exec slurmd -N {name}", env=_slurm_env(), quiet=True)


def wait_idle(names: list[str], timeout: float = 90) -> None:
    def ready() -> bool:
        out = sh("sinfo", "-h", "-N", "-o", "%N %t", check=False, quiet=True, env=_slurm_env()).stdout.split()
        states = dict(zip(out[::2], out[1::2]))
        for name in names:
            state = states.get(name, "")
            if state.startswith(("down", "drain", "drng", "fail")):
                sh("scontrol", "update", f"nodename={name}", "state=resume", check=False, quiet=True, env=_slurm_env())
        return all(states.get(name, "").rstrip("*~#!%$@^-") in ("idle", "mix", "alloc", "comp") for name in names)

    _wait(ready, timeout, f"nodes {names} did not become idle (see {LOGS}/)")


def stop_daemons() -> None:
    pids = [(path, _pid(path)) for path in sorted(RUN.glob("slurmd-*.pid")) + [RUN / "slurmctld.pid"]]
    for path, pid in pids:
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
    for path, pid in pids:
        if pid is not None:  # the process itself, not its pid file (removed before the daemon has finished)
            _wait(lambda: not _alive(pid), 30, f"{path.name} (pid {pid}) did not stop")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[-1].split()[0] == "Z")  # a zombie has exited


# ---- two-node networking ----
def network_up() -> None:
    if not Path(f"/sys/class/net/{BRIDGE}").exists():
        sh("ip", "link", "add", BRIDGE, "type", "bridge")
        sh("ip", "addr", "add", f"{BRIDGE_ADDR}/{PREFIX}", "dev", BRIDGE)
    sh("ip", "link", "set", BRIDGE, "up")
    existing = set(sh("ip", "netns", "list", quiet=True).stdout.split())
    for name, (netns, veth, addr) in NODES.items():
        if netns not in existing:
            sh("ip", "netns", "add", netns)
        if not Path(f"/sys/class/net/{veth}").exists():
            sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
            sh("ip", "link", "set", veth, "master", BRIDGE)
            sh("ip", "-n", netns, "addr", "add", f"{addr}/{PREFIX}", "dev", "eth0")
        sh("ip", "link", "set", veth, "up")
        sh("ip", "-n", netns, "link", "set", "lo", "up")
        sh("ip", "-n", netns, "link", "set", "eth0", "up")
    set_hosts({name: addr for name, (_, _, addr) in NODES.items()})


def network_down() -> None:
    existing = set(sh("ip", "netns", "list", check=False, quiet=True).stdout.split())
    for netns, veth, _ in NODES.values():
        if Path(f"/sys/class/net/{veth}").exists():
            sh("ip", "link", "del", veth, check=False)
        if netns in existing:
            sh("ip", "netns", "del", netns, check=False)
    if Path(f"/sys/class/net/{BRIDGE}").exists():
        sh("ip", "link", "del", BRIDGE, check=False)
    set_hosts({})


def set_hosts(entries: dict[str, str]) -> None:
    """Our block in /etc/hosts (names of the namespace nodes); everything else is left as it was."""
    lines, inside = [], False
    for line in HOSTS.read_text().splitlines():
        if line == HOSTS_BEGIN:
            inside = True
        elif line == HOSTS_END:
            inside = False
        elif not inside:
            lines.append(line)
    if entries:
        lines += [HOSTS_BEGIN, *(f"{addr} {name}" for name, addr in entries.items()), HOSTS_END]
    text = "\n".join(lines) + "\n"
    if text != HOSTS.read_text():
        HOSTS.write_text(text)  # in place: /etc/hosts may be a bind mount that a rename would break


# ---- commands ----
def start(nodes: int) -> None:
    if os.geteuid() != 0:
        raise ClusterError("the local cluster runs its daemons as root: run this with sudo")
    install()
    start_munge()
    for path in (STATE / "ctld", LOGS, RUN):
        path.mkdir(parents=True, exist_ok=True)
    previous = conf_nodes()
    text = render_conf(nodes)
    if previous and previous != nodes:
        stop_daemons()
    if previous == 2 and nodes == 1:
        network_down()
    if write_conf(text) and previous == nodes:
        stop_daemons()  # same mode, new settings (CPUs, memory): restart to read them
    if nodes == 2:
        network_up()
    start_controller()
    start_node_daemons(nodes)
    names = [hostname()] if nodes == 1 else list(NODES)
    wait_idle(names)
    print(f"local SLURM cluster up: partition {PARTITION!r}, nodes {', '.join(names)}, {os.cpu_count()} CPUs each")


def stop() -> None:
    stop_daemons()
    if conf_nodes() == 2 or Path(f"/sys/class/net/{BRIDGE}").exists():
        network_down()
    print("local SLURM cluster stopped")


def status() -> int:
    """0 when the controller answers and every node is usable."""
    if not shutil.which("sinfo") or not conf_nodes():
        print("no local cluster configured")
        return 1
    if "UP" not in sh("scontrol", "ping", check=False, quiet=True, env=_slurm_env()).stdout:
        print("slurmctld is not running")
        return 1
    out = sh("sinfo", "-h", "-N", "-o", "%N %t", check=False, quiet=True, env=_slurm_env()).stdout
    print(out.strip())
    states = out.split()[1::2]
    return 0 if states and all(s.rstrip("*~#!%$@^-") in ("idle", "mix", "alloc", "comp") for s in states) else 1


def _wait(ready, timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.5)
    raise ClusterError(message)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cluster.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    start_parser = sub.add_parser("start", help="install if needed, configure and start (idempotent)")
    start_parser.add_argument("--nodes", type=int, choices=(1, 2), default=1, help="1: this machine; 2: two namespaces")
    sub.add_parser("stop", help="stop the daemons and remove the namespaces")
    sub.add_parser("status", help="exit 0 when the cluster is up and its nodes are usable")
    args = parser.parse_args(argv)
    try:
        if args.command == "start":
            start(args.nodes)
        elif args.command == "stop":
            stop()
        else:
            return status()
    except ClusterError as err:
        print(f"cluster.py: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
