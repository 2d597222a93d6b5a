#!/usr/bin/env python3
"""Agent sampling cost vs the kernel's own cost of producing the same files.

A synthetic QEMU-like process maps N small VMAs (default 10,000; every other page of one region is
mprotect()ed so neighbours cannot merge) plus a 1 GiB MADV_HUGEPAGE guest-RAM region, touches them, and,
where /dev/kvm works, holds a real KVM VM fd so discovery and per-VM debugfs counters take the real path.

Measured, as CPU seconds (user+system) per operation, in --repeat interleaved rounds (each round
measures every quantity once, so background load hits kernel and agent alike); medians over rounds:
  kernel_cat      `cat` of the same files into /dev/null (child rusage), minus an empty `cat` baseline
  kernel_read     the same bytes read in-process with hostroot.read_file into new bytes (no parsing)
  agent_smaps     what the sampler does with one VM's smaps: Sampler._scan_smaps (read into the
                  sampler's reused buffer + smaps.scan_large_vmas) + guest_ram.attribute_guest_ram
  agent_vm        the agent's whole per-VM sample (smaps, mountinfo, status, stat, counters)
  agent_smaps_regex  the same with the regex candidate search (the fallback of hosts without the
                  compiled agent/_smapscan.c), measured in the same rounds where the compiled one is built
Breakdown rows: read_smaps_reused (the read into a ReadBuffer alone), scan_smaps (scan_large_vmas on
bytes already in memory), kernel_cat_maps (`cat /proc/PID/maps`: the least that any "read maps first
to find the big VMAs" scheme would add).
The ratios agent/kernel are what the target (<= 1.2) is about; ratio_*_per_round is the median of
the per-round ratios, less sensitive to load drifting between rounds.

To measure an older agent with this script: PYTHONPATH=DIR, where DIR/eptwatch/agent is that agent/
tree (e.g. `git archive <commit> agent | tar -x -C DIR/eptwatch`). What it lacks falls back to the
old inline read + scan (Sampler._scan_smaps) or is reported as None (hostroot.ReadBuffer).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from eptwatch.agent import hostroot
from eptwatch.agent import smaps as smaps_module
from eptwatch.agent.discovery import discover_vms
from eptwatch.agent.guest_ram import attribute_guest_ram
from eptwatch.agent.hostroot import HostRoot, read_file
from eptwatch.agent.model import Era
from eptwatch.agent.sampler import Sampler, SamplerConfig
from eptwatch.agent.smaps import parse_smaps, scan_large_vmas

CHILD = r"""
import ctypes, mmap, os, sys, fcntl
n = int(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
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
ram = libc.mmap(None, GIB + (2 << 20), RW, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x4000, -1, 0)  # MAP_NORESERVE
ram = (ram + (2 << 20) - 1) & ~((2 << 20) - 1)
libc.madvise(ram, GIB, 14)  # MADV_HUGEPAGE
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


def cpu_of(fn: Callable[[], object]) -> float:
    """CPU seconds (this thread's user+system) of one call of fn."""
    t0 = time.thread_time()
    fn()
    return time.thread_time() - t0


def cat_cpu(paths: list[str]) -> float:
    """CPU seconds of `cat paths > /dev/null` (child rusage) minus those of an empty `cat /dev/null`."""
    def one(args: list[str]) -> float:
        with open(os.devnull, "wb") as null:
            p = subprocess.Popen(args, stdout=null)
            _, _, ru = os.wait4(p.pid, 0)
        return ru.ru_utime + ru.ru_stime

    full = one(["cat", *paths])
    empty = one(["cat", os.devnull])
    return max(full - empty, 1e-9)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vmas", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=21)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(args.vmas)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        vmfd = int(child.stdout.readline())
        pid = child.pid
        root = HostRoot()
        smaps = f"/proc/{pid}/smaps"
        nvma = len(parse_smaps(open(smaps).read(), smaps))
        debug_dir = Path(f"/sys/kernel/debug/kvm/{pid}-{vmfd}")
        counter_files = [str(debug_dir / f) for f in ("pages_4k", "pages_2m", "pages_1g")] if debug_dir.is_dir() else []
        vm_files = [smaps, f"/proc/{pid}/mountinfo", f"/proc/{pid}/status", f"/proc/{pid}/stat", f"/proc/{pid}/cmdline", *counter_files]

        def raw_read(paths: list[str]) -> None:
            for p in paths:
                read_file(Path(p))

        config = SamplerConfig(smaps_mode="full", check_other_mappers=False)
        sampler = Sampler(root, config)
        smaps_path = Path(smaps)
        # The sampler's own per-VM smaps read (read into its reused buffer + scan); an older tree
        # without it gets the read + scan it did inline.
        scan_smaps = getattr(sampler, "_scan_smaps", None) or (
            lambda path: scan_large_vmas(read_file(path), str(path), config.guest_ram_min_bytes))

        def agent_smaps() -> list[object]:
            return attribute_guest_ram(scan_smaps(smaps_path), min_bytes=config.guest_ram_min_bytes)

        ram = agent_smaps()
        if len(ram) != 1:
            raise SystemExit(f"expected the 1 GiB guest-RAM region to be found, got {ram!r}")
        reuse = hostroot.ReadBuffer() if hasattr(hostroot, "ReadBuffer") else None

        def read_reused() -> None:
            assert reuse is not None
            read_file(smaps_path, into=reuse)

        in_memory = read_file(smaps_path)

        def scan_only() -> None:
            scan_large_vmas(in_memory, smaps, config.guest_ram_min_bytes)

        compiled_search = getattr(smaps_module, "_big_size_lines_c", None)
        regex_search = getattr(smaps_module, "_big_size_lines_regex", None)

        def with_regex(fn):  # type: ignore[no-untyped-def]
            def run() -> None:
                smaps_module._big_size_lines = regex_search
                try:
                    fn()
                finally:
                    smaps_module._big_size_lines = compiled_search
            return run

        (vm,) = [v for v in discover_vms(root, [(pid, vmfd)] if counter_files else [], scan_fds=False)[0] if v.pid == pid] or [None]
        kvm_dir = Path("/sys/kernel/debug/kvm") if counter_files else None

        def agent_vm() -> None:
            sampler._sample_vm(vm, kvm_dir, Era.HOST_PAGE_WALK)

        maps = f"/proc/{pid}/maps"
        load_before = os.getloadavg()
        keys = ("cat_smaps", "read_smaps", "agent_smaps", "cat_vm", "read_vm", "agent_vm", "read_smaps_reused", "scan_smaps", "cat_maps",
                "agent_smaps_regex", "scan_smaps_regex")
        rounds: dict[str, list[float]] = {k: [] for k in keys}
        for _ in range(args.repeat):
            rounds["cat_smaps"].append(cat_cpu([smaps]))
            rounds["read_smaps"].append(cpu_of(lambda: raw_read([smaps])))
            rounds["agent_smaps"].append(cpu_of(agent_smaps))
            rounds["cat_vm"].append(cat_cpu(vm_files))
            rounds["read_vm"].append(cpu_of(lambda: raw_read(vm_files)))
            if vm is not None:
                rounds["agent_vm"].append(cpu_of(agent_vm))
            if reuse is not None:
                rounds["read_smaps_reused"].append(cpu_of(read_reused))
            rounds["scan_smaps"].append(cpu_of(scan_only))
            rounds["cat_maps"].append(cat_cpu([maps]))
            if compiled_search is not None and regex_search is not None:
                rounds["agent_smaps_regex"].append(cpu_of(with_regex(agent_smaps)))
                rounds["scan_smaps_regex"].append(cpu_of(with_regex(scan_only)))
        med = {k: statistics.median(v) if v else None for k, v in rounds.items()}

        def per_round(num: str, den: str) -> float | None:
            pairs = [a / b for a, b in zip(rounds[num], rounds[den]) if b > 0]
            return statistics.median(pairs) if pairs else None

        results: dict[str, object] = {
            "vmas": nvma,
            "smaps_bytes": len(in_memory),
            "maps_bytes": len(read_file(Path(maps))),
            "rounds": args.repeat,
            "kernel_cat_smaps_s": med["cat_smaps"],
            "kernel_read_smaps_s": med["read_smaps"],
            "agent_smaps_s": med["agent_smaps"],
            "kernel_cat_vm_files_s": med["cat_vm"],
            "kernel_read_vm_files_s": med["read_vm"],
            "agent_vm_s": med["agent_vm"],
            "read_smaps_reused_s": med["read_smaps_reused"],
            "scan_smaps_s": med["scan_smaps"],
            "kernel_cat_maps_s": med["cat_maps"],
            "smaps_scanner": getattr(smaps_module, "SCANNER", "regex"),
            "agent_smaps_regex_s": med["agent_smaps_regex"],
            "scan_smaps_regex_s": med["scan_smaps_regex"],
            "per_vm_debugfs": bool(counter_files),
        }

        def ratio(num: str, den: str) -> float | None:
            a, b = med[num], med[den]
            return a / b if a is not None and b else None

        results["ratio_smaps_vs_cat"] = ratio("agent_smaps", "cat_smaps")
        results["ratio_smaps_vs_read"] = ratio("agent_smaps", "read_smaps")
        results["ratio_smaps_vs_cat_per_round"] = per_round("agent_smaps", "cat_smaps")
        if med["agent_smaps_regex"] is not None:
            results["ratio_smaps_regex_vs_cat_per_round"] = per_round("agent_smaps_regex", "cat_smaps")
        if med["agent_vm"] is not None:
            results["ratio_vm_vs_cat"] = ratio("agent_vm", "cat_vm")
            results["ratio_vm_vs_read"] = ratio("agent_vm", "read_vm")
            results["ratio_vm_vs_cat_per_round"] = per_round("agent_vm", "cat_vm")
        results["loadavg_1m_before_after"] = f"{load_before[0]:.2f} {os.getloadavg()[0]:.2f}"
        results["machine"] = f"{platform.node()} {platform.machine()} {os.cpu_count()} cpu, kernel {platform.release()}, Python {platform.python_version()}"
        if args.json:
            print(json.dumps(results, indent=2))
        else:
            for k, v in results.items():
                print(f"{k:26} {v:.6f}" if isinstance(v, float) else f"{k:26} {v}")
    finally:
        child.kill()
        child.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
