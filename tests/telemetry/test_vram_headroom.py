"""VRAM headroom: device memory split into Soberana's and everyone else's; threshold warnings."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

from soberana.telemetry.monitor import TelemetryMonitor, process_tree
from soberana.telemetry.nvml import NVMLReader
from tests.telemetry.test_nvml_exporter import samples, scrape

GiB = 2**30


def test_memory_is_split_by_owner(fake_nvml):
    # The recording has pid 4242 (60 GiB) and 5151 (9 GiB) on GPU 0, 70 GiB used in all.
    monitor = TelemetryMonitor([NVMLReader(fake_nvml)], own_pids=lambda: {4242}, threshold=0.9)
    monitor.poll()
    s = scrape(monitor)
    by_owner = {x.labels["owner"]: x.value for x in samples(s, "soberana:gpu_memory_used_bytes", "0")}
    assert by_owner == {"soberana": 60 * GiB, "other": 10 * GiB}  # 9 GiB + 1 GiB unattributed
    assert samples(s, "soberana:gpu_memory_over_threshold", "0")[0].value == 0
    assert samples(s, "soberana:gpu_memory_utilization_threshold")[0].value == 0.9


def test_another_process_pushing_past_the_threshold_warns_once_and_counts(fake_nvml, caplog):
    monitor = TelemetryMonitor([NVMLReader(fake_nvml)], own_pids=lambda: {4242}, threshold=0.9)
    monitor.poll()
    total = fake_nvml.devices[0]["memory"]["total"]
    intruder = [{"pid": 4242, "usedGpuMemory": 60 * GiB}, {"pid": 7777, "usedGpuMemory": 15 * GiB}]
    fake_nvml.set_memory_used(0, 60 * GiB + 15 * GiB + GiB, intruder)  # 76 GiB of 79.6: 95%
    with caplog.at_level(logging.WARNING, logger="soberana.telemetry"):
        monitor.poll()
        monitor.poll()  # still over: no second warning, no second crossing
    warnings = [r for r in caplog.records if "past --gpu-memory-utilization" in r.getMessage()]
    assert len(warnings) == 1 and "other processes 16.0 GiB" in warnings[0].getMessage()
    s = scrape(monitor)
    assert samples(s, "soberana:gpu_memory_over_threshold", "0")[0].value == 1
    assert samples(s, "soberana:gpu_memory_threshold_crossings_total", "0")[0].value == 1
    assert total > 0
    fake_nvml.set_memory_used(0, 61 * GiB, [{"pid": 4242, "usedGpuMemory": 60 * GiB}])
    monitor.poll()
    assert samples(scrape(monitor), "soberana:gpu_memory_over_threshold", "0")[0].value == 0


def test_memory_the_driver_reserves_counts_against_the_headroom(fake_nvml):
    # As an H100 with a current driver reported it: "used" 71 GiB of 79.6, but 5 GiB more held
    # back by the driver (in neither used nor free), so CUDA could allocate only 3.6 GiB more.
    monitor = TelemetryMonitor([NVMLReader(fake_nvml)], own_pids=lambda: {4242}, threshold=0.92)
    fake_nvml.set_memory_used(0, 71 * GiB, [{"pid": 4242, "usedGpuMemory": 70 * GiB}],
                              reserved=5 * GiB)  # fmt: skip
    monitor.poll()
    s = scrape(monitor)
    assert samples(s, "soberana:gpu_memory_over_threshold", "0")[0].value == 1
    by_owner = {x.labels["owner"]: x.value for x in samples(s, "soberana:gpu_memory_used_bytes", "0")}
    assert by_owner == {"soberana": 70 * GiB, "other": 6 * GiB}  # 1 GiB unattributed + 5 reserved


def test_standalone_exporter_has_no_owner_split(fake_nvml):
    monitor = TelemetryMonitor([NVMLReader(fake_nvml)])
    monitor.poll()
    assert samples(scrape(monitor), "soberana:gpu_memory_used_bytes") == []


def test_process_tree_holds_this_process_and_its_children():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        tree = process_tree()
        assert os.getpid() in tree and child.pid in tree
        assert 1 not in tree
    finally:
        child.kill()
        child.wait()
