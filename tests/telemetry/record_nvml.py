"""Record the NVML readings of this host's GPUs to JSON, for the fake NVML the CPU tests replay.

Run on a GPU host: `python tests/telemetry/record_nvml.py > tests/telemetry/recordings/NAME.json`.
A reading the device does not support is recorded as null (the fake then raises
NVML_ERROR_NOT_SUPPORTED, as the driver did).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pynvml as n


def _try(read):
    try:
        return read()
    except n.NVMLError:
        return None


def _text(v):
    return v.decode() if isinstance(v, bytes) else v


def record() -> dict:
    n.nvmlInit()
    devices = []
    for i in range(n.nvmlDeviceGetCount()):
        h = n.nvmlDeviceGetHandleByIndex(i)
        mem = n.nvmlDeviceGetMemoryInfo(h)
        util = _try(lambda h=h: n.nvmlDeviceGetUtilizationRates(h))
        nvlink = _try(lambda h=h: n.nvmlDeviceGetFieldValues(
            h, [n.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX, n.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX]))
        nvlink_ok = nvlink is not None and all(fv.nvmlReturn == 0 for fv in nvlink)
        procs = _try(lambda h=h: n.nvmlDeviceGetComputeRunningProcesses(h)) or []
        devices.append({
            "uuid": _text(n.nvmlDeviceGetUUID(h)),
            "name": _text(n.nvmlDeviceGetName(h)),
            "busId": _text(n.nvmlDeviceGetPciInfo(h).busId),
            "memory": {"total": mem.total, "free": mem.free, "used": mem.used},
            "temperature": _try(lambda h=h: n.nvmlDeviceGetTemperature(h, n.NVML_TEMPERATURE_GPU)),
            "power_mw": _try(lambda h=h: n.nvmlDeviceGetPowerUsage(h)),
            "energy_mj": _try(lambda h=h: n.nvmlDeviceGetTotalEnergyConsumption(h)),
            "utilization": None if util is None else {"gpu": util.gpu, "memory": util.memory},
            "clock_sm": _try(lambda h=h: n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_SM)),
            "clock_mem": _try(lambda h=h: n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_MEM)),
            "clocks_event_reasons": _try(lambda h=h: n.nvmlDeviceGetCurrentClocksEventReasons(h)),
            "ecc_dbe_volatile": _try(lambda h=h: n.nvmlDeviceGetTotalEccErrors(
                h, n.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, n.NVML_VOLATILE_ECC)),
            "retired_dbe_pages": _try(lambda h=h: list(n.nvmlDeviceGetRetiredPages(
                h, n.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR))),
            "nvlink_kib": [fv.value.ullVal for fv in nvlink] if nvlink_ok else None,
            "processes": [{"pid": p.pid, "usedGpuMemory": p.usedGpuMemory} for p in procs],
            "xid_events": [],
        })
    smi = subprocess.run(
        ["nvidia-smi", "--query-gpu=uuid,memory.used,memory.total,temperature.gpu,power.draw,"
         "clocks.sm,clocks.mem", "--format=csv,noheader,nounits"],
        capture_output=True, text=True, check=False)
    return {"driver": _text(n.nvmlSystemGetDriverVersion()), "devices": devices,
            "nvidia_smi_csv": smi.stdout}


if __name__ == "__main__":
    json.dump(record(), sys.stdout, indent=1)
    sys.stdout.write("\n")
