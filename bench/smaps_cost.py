#!/usr/bin/env python3
"""Agent sampling cost vs the kernel's own cost of producing the same files (issue 12 targets).

A QEMU-like child (comm `qemu-system-x86`) maps N small VMAs (default 10,000; every other page of one
region is mprotect()ed so neighbours cannot merge) plus guest RAM as a 1 GiB memfd mapped shared and
touched, and, where /dev/kvm works, holds a real KVM VM fd, so discovery and the per-VM debugfs
counters take the real path. --fd-holders processes that are no VMM hold --fds-each fds each (a
host's other daemons), so discovery runs on a host with thousands of fds.

Measured as CPU seconds (user+system) per operation, in --repeat interleaved rounds (each round
measures every quantity once, so background load hits kernel and agent alike); ratios are medians of
the per-round ratios, figures medians over rounds. Every timed quantity runs right after an untimed
`cat` of the files it reads, on the same CPU, so that each starts from the same cache state (a child
process just read those files): on this machine what ran just before moves a 0.5 ms figure by 0.1 to
0.35 ms (docs/benchmarks.md, 2026-12-06 "equal starting states"). What ran before that `cat` still
shows (a quantity timed after three `cat` processes costs more than one timed after one), so the
quantities take a new order in every round (--seed). Before these changes the rounds ran back to back
in a fixed order, and the widened fixture's `cat` came right after the kernel had made 7 MB of smaps
(its file out of cache) while the agent came right after that `cat` (its file in cache).
  cat_smaps        `cat` of the child's smaps into /dev/null (child rusage, minus an empty `cat`)
  agent_smaps      Sampler._scan_smaps (smaps streamed through the scanner's small buffer, each chunk
                   scanned while in cache) + guest_ram.attribute_guest_ram. Target: <= 1.10 x cat_smaps
  agent_smaps_regex  the same with the regex search and Python line count (hosts without the
                   compiled agent/sources/_smapscan.c), in the same rounds
  cat_widened / agent_widened  the same scan over a fixture's smaps widened to N VMAs, in a tmpfs
                   file (`cat` of a page-cache file is a copy, far cheaper than the kernel making smaps)
  discovery        list_vm_dirs + discover_vms on the live host. Target: <= 0.3 x agent_smaps
  agent_sample     one VM's whole sample: discovery, THP settings, per-VM counters, smaps, mountinfo,
                   status, stat, the model. cat_sample: `cat` of every file it read (recorded once).
                   Target: <= 1.25 x cat_sample
Breakdown rows: read_smaps_whole (the old read of the whole file into a ReadBuffer, no scan) and
scan_smaps (scan_large_vmas on bytes already in memory). Where the compiled read loop is built
(_smapscan.FdScan): drain_smaps / drain_widened, the same C loop reading the file into the same
128 KiB buffer and scanning nothing (the floor of the agent's read: what 1.10 x `cat` leaves for the
scan), count_smaps / count_widened, the same read with each chunk's newlines counted (AVX-512 where
the CPU has it): the least any scan that can name an error's line has to do, so the floor of what
the 1.10 target can be held to; and agent_widened_uncached, the widened scan with the scanner's memory
of the first and last blocks cleared first (they are parsed again, as when a process is sampled for
the first time).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from eptwatch.agent.model.predicate import Era, VmInputs, estimate_vm
from eptwatch.agent.model.sampler import Sampler, SamplerConfig
from eptwatch.agent.sources import hostroot
from eptwatch.agent.sources import smaps as smaps_module
from eptwatch.agent.sources.discovery import discover_vms
from eptwatch.agent.sources.guest_ram import attribute_guest_ram
from eptwatch.agent.sources.hostroot import HostRoot, read_file
from eptwatch.agent.sources.kvm_debugfs import list_vm_dirs
from eptwatch.agent.sources.smaps import parse_smaps, scan_large_vmas
from eptwatch.agent.sources.thp import read_thp_settings

CHILD = r"""
import ctypes, mmap, os, sys, fcntl
n = int(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl(15, b"qemu-system-x86", 0, 0, 0)  # PR_SET_NAME: discovery finds it by comm, as a QEMU
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
PAGE = 4096
RW, R = mmap.PROT_READ | mmap.PROT_WRITE, mmap.PROT_READ
base = libc.mmap(None, n * PAGE, RW, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
buf = (ctypes.c_char * (n * PAGE)).from_address(base)
for i in range(0, n, 2):
    buf[i * PAGE] = b"x"
for i in range(1, n, 2):
    libc.mprotect(base + i * PAGE, PAGE, R)
GIB = 1 << 30
# Guest RAM as libvirt's <source type='memfd'/> gives it: a 1 GiB memfd mapped shared, touched.
mfd = os.memfd_create("pc.ram", 0)
os.ftruncate(mfd, GIB)
ram = libc.mmap(None, GIB, RW, mmap.MAP_SHARED, mfd, 0)
libc.madvise(ram, GIB, 14)  # MADV_HUGEPAGE (shmem THP, where shmem_enabled allows it)
ramb = (ctypes.c_char * GIB).from_address(ram)
for off in range(0, GIB, PAGE):
    ramb[off] = b"y"
vmfd = -1
try:
    kvm = os.open("/dev/kvm", os.O_RDWR)
    vmfd = fcntl.ioctl(kvm, 0xAE01, 0)
except OSError:
    pass
print(vmfd, flush=True)
sys.stdin.read()
"""

# A process that is no VMM and holds many fds (a host's other daemons): discovery must not read them.
FD_HOLDER = r"""
import os, sys
fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(int(sys.argv[1]))]
print("ready", flush=True)
sys.stdin.read()
"""


def host_fd_count() -> int:
    total = 0
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                total += len(os.listdir(f"/proc/{name}/fd"))
            except OSError:
                pass
    return total


def cpu_of(fn: Callable[[], object]) -> float:
    """CPU seconds (this thread's user+system) of one call of fn."""
    t0 = time.thread_time()
    fn()
    return time.thread_time() - t0


def cat_cpu(paths: list[str]) -> float:
    """CPU seconds of `cat paths > /dev/null` (child rusage) minus those of an empty `cat /dev/null`."""
    def one(args: list[str]) -> float:
        with open(os.devnull, "wb") as null:
            # stderr too: a file of a process that exited since it was recorded is simply not read.
            p = subprocess.Popen(args, stdout=null, stderr=null)
            _, _, ru = os.wait4(p.pid, 0)
        return ru.ru_utime + ru.ru_stime

    full = one(["cat", *paths])
    empty = one(["cat", os.devnull])
    return max(full - empty, 1e-9)


def settle(paths: list[str]) -> None:
    """`cat paths > /dev/null`, untimed: the state every timed quantity starts from (see the docstring)."""
    with open(os.devnull, "wb") as null:
        subprocess.run(["cat", *paths], stdout=null, stderr=null, check=False)


def fs_type(path: Path) -> str:
    """The file system type /proc/self/mounts gives for the mount holding `path` (tmpfs, ext4, ...)."""
    best, kind = "", "?"
    for line in open("/proc/self/mounts"):
        parts = line.split()
        if len(parts) > 2 and str(path.resolve()).startswith(parts[1].rstrip("/") + "/") and len(parts[1]) >= len(best):
            best, kind = parts[1], parts[2]
    return kind


def widened_fixture(target_vmas: int) -> bytes:
    """A fixture's smaps (the 6.6 host, whose QEMU has guest RAM) widened to about `target_vmas` VMAs
    by repeating its small blocks between the first and the last block."""
    text = (Path(__file__).resolve().parent.parent / "tests/fixtures/linux-6.6-pages2m/proc/8100/smaps").read_text()
    blocks = re.split(r"(?m)^(?=[0-9a-f]+-[0-9a-f]+ )", text)
    blocks = [b for b in blocks if b]
    small = [b for b in blocks[1:-1] if int(re.search(r"(?m)^Size:\s+(\d+) kB", b).group(1)) * 1024 < SamplerConfig().guest_ram_min_bytes]  # type: ignore[union-attr]
    middle = (small * (target_vmas // max(1, len(small)) + 1))[: max(0, target_vmas - len(blocks))]
    return "".join([blocks[0], *middle, *blocks[1:]]).encode()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vmas", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=21)
    ap.add_argument("--fd-holders", type=int, default=20, help="processes that are no VMM, each holding --fds-each fds")
    ap.add_argument("--fds-each", type=int, default=100)
    ap.add_argument("--seed", type=int, default=1, help="seed of the order the quantities take in each round")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(args.vmas)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    holders = [subprocess.Popen([sys.executable, "-c", FD_HOLDER, str(args.fds_each)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
               for _ in range(args.fd_holders)]
    widened_path = Path(tempfile.mkdtemp(prefix="smaps-cost-")) / "smaps"
    try:
        for h in holders:
            assert h.stdout is not None and h.stdout.readline().strip() == "ready"
        assert child.stdout is not None
        vmfd = int(child.stdout.readline())
        pid = child.pid
        root = HostRoot()
        smaps = f"/proc/{pid}/smaps"
        nvma = len(parse_smaps(open(smaps).read(), smaps))
        kvm_dir = Path("/sys/kernel/debug/kvm") if Path("/sys/kernel/debug/kvm").is_dir() else None
        debug_dir = Path(f"/sys/kernel/debug/kvm/{pid}-{vmfd}")
        counter_files = [str(debug_dir / f) for f in ("pages_4k", "pages_2m", "pages_1g")] if debug_dir.is_dir() else []

        # Only the options this agent has (use_binary_stats goes away with the binary-stats collector).
        wanted = {"smaps_mode": "full", "check_other_mappers": False, "use_binary_stats": False, "use_qmp": False}
        config = SamplerConfig(**{k: v for k, v in wanted.items() if k in {f.name for f in dataclasses.fields(SamplerConfig)}})  # type: ignore[arg-type]
        sampler = Sampler(root, config)
        smaps_path = Path(smaps)

        def agent_smaps() -> list[object]:
            return attribute_guest_ram(sampler._scan_smaps(smaps_path), min_bytes=config.guest_ram_min_bytes)

        ram = agent_smaps()
        if len(ram) != 1:
            raise SystemExit(f"expected the 1 GiB guest-RAM region to be found, got {ram!r}")
        reuse = hostroot.ReadBuffer()
        in_memory = read_file(smaps_path)

        def read_whole_reused() -> None:
            read_file(smaps_path, into=reuse)

        def scan_only() -> None:
            scan_large_vmas(in_memory, smaps, config.guest_ram_min_bytes)

        compiled_search = smaps_module._big_size_lines_c
        compiled_count = getattr(smaps_module, "_count_newlines", None)  # None: an agent before the streaming scan

        def with_regex(fn: Callable[[], object]) -> Callable[[], None]:
            def run() -> None:
                smaps_module._big_size_lines = smaps_module._big_size_lines_regex
                if compiled_count is not None:
                    smaps_module._count_newlines = smaps_module._count_newlines_py
                try:
                    fn()
                finally:
                    smaps_module._big_size_lines = compiled_search or smaps_module._big_size_lines_regex
                    if compiled_count is not None:
                        smaps_module._count_newlines = compiled_count
            return run

        widened_path.write_bytes(widened_fixture(args.vmas))
        widened_scanner = smaps_module.LargeVmaScanner() if hasattr(smaps_module, "LargeVmaScanner") else None

        def agent_widened() -> list[object]:
            if widened_scanner is None:  # an agent before the streaming scan: read whole, then scan
                return scan_large_vmas(read_file(widened_path, into=reuse), str(widened_path), config.guest_ram_min_bytes)  # type: ignore[return-value]
            widened_scanner.start(str(widened_path), config.guest_ram_min_bytes)
            read_file(widened_path, into=widened_scanner)
            return widened_scanner.finish()  # type: ignore[return-value]

        if not agent_widened():
            raise SystemExit("expected guest RAM in the widened fixture")

        def agent_widened_uncached() -> None:
            if widened_scanner is not None and hasattr(widened_scanner, "_parsed"):
                widened_scanner._parsed.clear()
            agent_widened()

        fd_scan_class = getattr(smaps_module, "_FdScan", None)
        drain_scan = fd_scan_class(smaps_module.CHUNK_BYTES) if fd_scan_class is not None else None

        def drain(path: str, count: bool = False) -> Callable[[], None]:
            def run() -> None:
                assert drain_scan is not None
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
                try:
                    drain_scan.drain(fd, count) if count else drain_scan.drain(fd)
                finally:
                    os.close(fd)
            return run

        def discovery() -> list[object]:
            vm_dirs = list_vm_dirs(root, kvm_dir) if kvm_dir is not None else []
            return discover_vms(root, vm_dirs)[0]  # type: ignore[return-value]

        found = [v for v in discovery() if v.pid == pid]  # type: ignore[attr-defined]
        if not found:
            raise SystemExit("discovery did not find the QEMU-like child")
        thp = read_thp_settings(root)[0]

        def agent_sample() -> None:
            """One VM's whole sample: discovery, THP settings, counters, smaps, model."""
            (vm,) = [v for v in discovery() if v.pid == pid]  # type: ignore[attr-defined]
            s = sampler._sample_vm(vm, kvm_dir, Era.HOST_PAGE_WALK)
            estimate_vm(VmInputs(vm_id=vm.vm_id, host_huge=s.host_huge, mappings=s.mappings, whole_process=s.whole_process,
                                 counters=s.counters, counter_scope=s.counters.scope if s.counters else None,
                                 thp_enabled_for_process=s.thp_enabled_for_process),
                        Era.HOST_PAGE_WALK, read_thp_settings(root)[0], config.model)

        # The files that sample reads, recorded once: `cat` of them is the kernel's cost of producing them.
        read_paths: list[str] = []
        original_read_bytes = HostRoot.read_bytes

        def recording(self: HostRoot, path: Path, *a: object, **k: object) -> object:
            read_paths.append(str(path))
            return original_read_bytes(self, path, *a, **k)  # type: ignore[call-overload]

        HostRoot.read_bytes = recording  # type: ignore[method-assign,assignment]
        try:
            agent_sample()
        finally:
            HostRoot.read_bytes = original_read_bytes  # type: ignore[method-assign]
        sample_files = [p for p in read_paths if os.path.exists(p)]
        del thp

        load_before = os.getloadavg()
        widened = str(widened_path)
        # (quantity, the files it reads, the timed call): each is timed right after settle(files).
        plan: list[tuple[str, list[str], Callable[[], float]]] = [
            ("cat_smaps", [smaps], lambda: cat_cpu([smaps])),
            ("agent_smaps", [smaps], lambda: cpu_of(agent_smaps)),
            ("read_smaps_whole", [smaps], lambda: cpu_of(read_whole_reused)),
            ("scan_smaps", [os.devnull], lambda: cpu_of(scan_only)),
        ]
        if compiled_search is not None:
            plan.append(("agent_smaps_regex", [smaps], lambda: cpu_of(with_regex(agent_smaps))))
        # An agent from before 2026-12-06 has no counting drain: its count rows stay empty.
        counts = drain_scan is not None and "count" in (type(drain_scan).drain.__doc__ or "")
        if drain_scan is not None:
            plan.append(("drain_smaps", [smaps], lambda: cpu_of(drain(smaps))))
        if counts:
            plan.append(("count_smaps", [smaps], lambda: cpu_of(drain(smaps, count=True))))
        plan += [
            ("cat_widened", [widened], lambda: cat_cpu([widened])),
            ("agent_widened", [widened], lambda: cpu_of(agent_widened)),
            ("agent_widened_uncached", [widened], lambda: cpu_of(agent_widened_uncached)),
        ]
        if drain_scan is not None:
            plan.append(("drain_widened", [widened], lambda: cpu_of(drain(widened))))
        if counts:
            plan.append(("count_widened", [widened], lambda: cpu_of(drain(widened, count=True))))
        plan += [
            ("discovery", [os.devnull], lambda: cpu_of(discovery)),
            ("cat_sample", sample_files, lambda: cat_cpu(sample_files)),
            ("agent_sample", sample_files, lambda: cpu_of(agent_sample)),
        ]
        # Every quantity gets a row, empty (None) where this agent lacks the part it measures.
        keys = ("cat_smaps", "agent_smaps", "read_smaps_whole", "scan_smaps", "agent_smaps_regex", "drain_smaps", "count_smaps",
                "cat_widened", "agent_widened", "agent_widened_uncached", "drain_widened", "count_widened", "discovery",
                "cat_sample", "agent_sample")
        rounds: dict[str, list[float]] = {k: [] for k in keys}
        order = random.Random(args.seed)
        for _ in range(args.repeat):
            for key, files, timed in order.sample(plan, len(plan)):
                settle(files)
                rounds[key].append(timed())
        med = {k: statistics.median(v) if v else None for k, v in rounds.items()}

        def per_round(num: str, den: str) -> float | None:
            pairs = [a / b for a, b in zip(rounds[num], rounds[den]) if b > 0]
            return statistics.median(pairs) if pairs else None

        cpu_model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
        results: dict[str, object] = {
            "vmas": nvma,
            "smaps_bytes": len(in_memory),
            "widened_fixture_bytes": widened_path.stat().st_size,
            "host_fds": host_fd_count(),
            "host_processes": sum(1 for n in os.listdir("/proc") if n.isdigit()),
            "sample_files": len(sample_files),
            "rounds": args.repeat,
            "smaps_scanner": smaps_module.SCANNER,
            "agent_module": smaps_module.__file__,
            "fd_scan": getattr(smaps_module, "_FdScan", None) is not None,
            "per_vm_debugfs": bool(counter_files),
        }
        results.update({f"{k}_ms": round(v * 1000, 3) if v is not None else None for k, v in med.items()})
        results["ratio_smaps_vs_cat"] = per_round("agent_smaps", "cat_smaps")
        results["ratio_smaps_regex_vs_cat"] = per_round("agent_smaps_regex", "cat_smaps")
        results["ratio_widened_vs_cat_widened"] = per_round("agent_widened", "cat_widened")
        results["ratio_widened_vs_cat_smaps"] = per_round("agent_widened", "cat_smaps")
        results["ratio_widened_uncached_vs_cat_widened"] = per_round("agent_widened_uncached", "cat_widened")
        results["ratio_drain_widened_vs_cat_widened"] = per_round("drain_widened", "cat_widened") if rounds["drain_widened"] else None
        results["ratio_drain_smaps_vs_cat"] = per_round("drain_smaps", "cat_smaps") if rounds["drain_smaps"] else None
        results["ratio_count_widened_vs_cat_widened"] = per_round("count_widened", "cat_widened") if rounds["count_widened"] else None
        results["ratio_count_smaps_vs_cat"] = per_round("count_smaps", "cat_smaps") if rounds["count_smaps"] else None
        # The agent against the least an exact scan must do (read + line count): what is left is the scan's own work.
        results["ratio_widened_vs_count_widened"] = per_round("agent_widened", "count_widened") if rounds["count_widened"] else None
        results["ratio_smaps_vs_count_smaps"] = per_round("agent_smaps", "count_smaps") if rounds["count_smaps"] else None
        results["widened_dir"] = f"{widened_path.parent} ({fs_type(widened_path.parent)})"
        results["ratio_discovery_vs_agent_smaps"] = per_round("discovery", "agent_smaps")
        results["ratio_sample_vs_cat"] = per_round("agent_sample", "cat_sample")
        results["order_seed"] = args.seed
        results["loadavg_1m_before_after"] = f"{load_before[0]:.2f} {os.getloadavg()[0]:.2f}"
        results["machine"] = f"{cpu_model}, {os.cpu_count()} cpu, kernel {platform.release()}, Python {platform.python_version()}"
        if args.json:
            print(json.dumps(results, indent=2))
        else:
            for k, v in results.items():
                print(f"{k:32} {v:.4f}" if isinstance(v, float) else f"{k:32} {v}")
    finally:
        for p in [child, *holders]:
            p.kill()
            p.wait()
        shutil.rmtree(widened_path.parent, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
