"""A stand-in for the `pynvml` module that replays a recording (recordings/*.json).

This is the one fake the telemetry tests use, at the hardware boundary: everything above
`pynvml` is Soberana's real code. Calls, constants and error behaviour mirror nvidia-ml-py:
a reading recorded as null raises NVMLError(NVML_ERROR_NOT_SUPPORTED); an empty event queue
raises NVMLError(NVML_ERROR_TIMEOUT).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pynvml

RECORDINGS = Path(__file__).parent / "recordings"


class FakeNVML:
    """Module-shaped: pass it where NVMLReader takes `nvml`."""

    NVMLError = pynvml.NVMLError
    NVML_TEMPERATURE_GPU = pynvml.NVML_TEMPERATURE_GPU
    NVML_CLOCK_SM = pynvml.NVML_CLOCK_SM
    NVML_CLOCK_MEM = pynvml.NVML_CLOCK_MEM
    NVML_MEMORY_ERROR_TYPE_UNCORRECTED = pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED
    NVML_VOLATILE_ECC = pynvml.NVML_VOLATILE_ECC
    NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR = pynvml.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR
    NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX = pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX
    NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX = pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX
    nvmlEventTypeXidCriticalError = pynvml.nvmlEventTypeXidCriticalError

    def __init__(self, recording: dict | str) -> None:
        if isinstance(recording, str):
            recording = json.loads((RECORDINGS / f"{recording}.json").read_text())
        self.devices = recording["devices"]
        self.initialized = False
        self.pending_xids: list[tuple[int, int]] = [
            (i, x) for i, d in enumerate(self.devices) for x in d.get("xid_events", [])
        ]

    # -- what tests change between polls --
    def inject_xid(self, index: int, xid: int) -> None:
        self.pending_xids.append((index, xid))

    def set_memory_used(self, index: int, used: int, processes: list[dict] | None = None,
                        reserved: int = 0) -> None:
        """`reserved`: memory the driver holds back, in neither "used" nor "free" (as current
        NVIDIA drivers report it)."""
        mem = self.devices[index]["memory"]
        mem["used"], mem["free"] = used, mem["total"] - used - reserved
        if processes is not None:
            self.devices[index]["processes"] = processes

    # -- the pynvml surface NVMLReader uses --
    def nvmlInit(self) -> None:
        self.initialized = True

    def nvmlShutdown(self) -> None:
        self.initialized = False

    def nvmlDeviceGetCount(self) -> int:
        self._check_init()
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        self._check_init()
        return i  # a handle is opaque to callers; the index serves

    def nvmlDeviceGetUUID(self, h):
        return self.devices[h]["uuid"]

    def nvmlDeviceGetName(self, h):
        return self.devices[h]["name"]

    def nvmlDeviceGetPciInfo(self, h):
        return SimpleNamespace(busId=self.devices[h]["busId"])

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(**self.devices[h]["memory"])

    def nvmlDeviceGetTemperature(self, h, sensor):
        assert sensor == self.NVML_TEMPERATURE_GPU
        return self._get(h, "temperature")

    def nvmlDeviceGetPowerUsage(self, h):
        return self._get(h, "power_mw")

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        return self._get(h, "energy_mj")

    def nvmlDeviceGetUtilizationRates(self, h):
        return SimpleNamespace(**self._get(h, "utilization"))

    def nvmlDeviceGetClockInfo(self, h, clock):
        return self._get(h, "clock_sm" if clock == self.NVML_CLOCK_SM else "clock_mem")

    def nvmlDeviceGetCurrentClocksEventReasons(self, h):
        return self._get(h, "clocks_event_reasons")

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, h):
        return self._get(h, "clocks_event_reasons")

    def nvmlDeviceGetTotalEccErrors(self, h, error_type, counter_type):
        assert (error_type, counter_type) == (self.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
                                              self.NVML_VOLATILE_ECC)
        return self._get(h, "ecc_dbe_volatile")

    def nvmlDeviceGetRetiredPages(self, h, cause):
        assert cause == self.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR
        return self._get(h, "retired_dbe_pages")

    def nvmlDeviceGetFieldValues(self, h, field_ids):
        kib = self.devices[h]["nvlink_kib"]
        # The driver answers per field: NOT_SUPPORTED (3) on a card without NVLink.
        return [SimpleNamespace(nvmlReturn=3 if kib is None else 0,
                                value=SimpleNamespace(ullVal=0 if kib is None else kib[k]))
                for k in range(len(field_ids))]

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        return [SimpleNamespace(**p) for p in self.devices[h]["processes"]]

    def nvmlDeviceGetGraphicsRunningProcesses(self, h):
        return []

    def nvmlEventSetCreate(self):
        return "event-set"

    def nvmlDeviceRegisterEvents(self, h, types, event_set):
        assert types == self.nvmlEventTypeXidCriticalError

    def nvmlEventSetWait(self, event_set, timeout_ms):
        if not self.pending_xids:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_TIMEOUT)
        index, xid = self.pending_xids.pop(0)
        return SimpleNamespace(device=index, eventData=xid,
                               eventType=self.nvmlEventTypeXidCriticalError)

    def nvmlEventSetFree(self, event_set) -> None:
        pass

    def _get(self, h, key):
        value = self.devices[h][key]
        if value is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return value

    def _check_init(self) -> None:
        if not self.initialized:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_UNINITIALIZED)
