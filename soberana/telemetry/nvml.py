"""NVIDIA GPUs through NVML (nvidia-ml-py), read into DCGM-named values.

The `nvml` module is a constructor argument so tests can hand in a fake at the library
boundary; everything above it is the real code path.
"""

from __future__ import annotations

import logging
from types import ModuleType
from typing import Any

from soberana.telemetry.reading import GPUReading

logger = logging.getLogger("soberana.telemetry")

_MIB = 1024 * 1024


class NVMLReader:
    """Reads every NVIDIA GPU the driver shows; `available` is False without driver or GPU."""

    def __init__(self, nvml: ModuleType | None = None) -> None:
        self.nvml: Any = nvml
        self.handles: list[Any] = []
        self.events: Any = None  # NVML event set for XID errors, None where unsupported
        self.last_xid: dict[int, int] = {}
        self.available = False
        try:
            if self.nvml is None:
                import pynvml

                self.nvml = pynvml
            self.nvml.nvmlInit()
            count = self.nvml.nvmlDeviceGetCount()
        except Exception as exc:  # no library, no driver, no device: no series, no error
            logger.debug("NVML unavailable: %s", exc)
            return
        self.handles = [self.nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        self.last_xid = {i: 0 for i in range(count)}
        self.available = count > 0
        self._register_xid_events()

    def _register_xid_events(self) -> None:
        n = self.nvml
        try:
            self.events = n.nvmlEventSetCreate()
        except Exception as exc:
            logger.info("NVML: no event sets (%s); DCGM_FI_DEV_XID_ERRORS not exported", exc)
            return
        for handle in self.handles:
            try:
                n.nvmlDeviceRegisterEvents(handle, n.nvmlEventTypeXidCriticalError, self.events)
            except Exception as exc:  # e.g. a GPU without XID event support
                logger.info("NVML: XID events unsupported on a device: %s", exc)

    def close(self) -> None:
        """Release NVML (once per reader)."""
        if not self.available:
            return
        if self.events is not None:
            self.nvml.nvmlEventSetFree(self.events)
            self.events = None
        self.nvml.nvmlShutdown()
        self.available = False

    def read(self) -> list[GPUReading]:
        """A reading of each device; fields the device does not support are left out."""
        if not self.available:
            return []
        self._drain_xid_events()
        return [self._read_one(i, h) for i, h in enumerate(self.handles)]

    def _drain_xid_events(self) -> None:
        """Take every XID event queued since the last read (wait 0 ms: never block)."""
        if self.events is None:
            return
        while True:
            try:
                event = self.nvml.nvmlEventSetWait(self.events, 0)
            except Exception:  # NVML_ERROR_TIMEOUT: the queue is empty
                return
            index = self._index_of(event.device)
            if index is not None:
                self.last_xid[index] = int(event.eventData)
                logger.error("GPU %d reported XID %d", index, int(event.eventData))

    def _index_of(self, handle: Any) -> int | None:
        for i, h in enumerate(self.handles):
            if h == handle:
                return i
        return None

    def _read_one(self, index: int, handle: Any) -> GPUReading:
        n = self.nvml
        reading = GPUReading(
            gpu=index,
            uuid=_text(n.nvmlDeviceGetUUID(handle)),
            model_name=_text(n.nvmlDeviceGetName(handle)),
            pci_bus_id=_text(n.nvmlDeviceGetPciInfo(handle).busId),
            device=f"nvidia{index}",
        )
        v = reading.values

        def put(name: str, read: Any) -> None:
            try:
                v[name] = float(read())
            except Exception:  # NVML_ERROR_NOT_SUPPORTED and friends: no series
                pass

        # Version 2 (drivers R510+) reports the driver's reserved memory apart, and its `used`
        # leaves it out, as DCGM's FB_USED and nvidia-smi's memory.used do; version 1's `used`
        # includes it (hundreds of MiB on an H100), so it is only the fallback.
        mem = _try(lambda: n.nvmlDeviceGetMemoryInfo(handle, version=n.nvmlMemory_v2))
        if mem is None:
            mem = _try(lambda: n.nvmlDeviceGetMemoryInfo(handle))
        if mem is not None:
            v["DCGM_FI_DEV_FB_USED"] = mem.used / _MIB
            v["DCGM_FI_DEV_FB_FREE"] = mem.free / _MIB
            v["DCGM_FI_DEV_FB_TOTAL"] = mem.total / _MIB
            if getattr(mem, "reserved", None) is not None:
                v["DCGM_FI_DEV_FB_RESERVED"] = mem.reserved / _MIB
        put("DCGM_FI_DEV_GPU_TEMP", lambda: n.nvmlDeviceGetTemperature(handle, n.NVML_TEMPERATURE_GPU))
        put("DCGM_FI_DEV_POWER_USAGE", lambda: n.nvmlDeviceGetPowerUsage(handle) / 1000.0)
        put("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
            lambda: n.nvmlDeviceGetTotalEnergyConsumption(handle))
        util = _try(lambda: n.nvmlDeviceGetUtilizationRates(handle))
        if util is not None:
            v["DCGM_FI_DEV_GPU_UTIL"] = float(util.gpu)
            v["DCGM_FI_DEV_MEM_COPY_UTIL"] = float(util.memory)
        put("DCGM_FI_DEV_SM_CLOCK", lambda: n.nvmlDeviceGetClockInfo(handle, n.NVML_CLOCK_SM))
        put("DCGM_FI_DEV_MEM_CLOCK", lambda: n.nvmlDeviceGetClockInfo(handle, n.NVML_CLOCK_MEM))
        reasons = _try(lambda: n.nvmlDeviceGetCurrentClocksEventReasons(handle))
        if reasons is None:  # drivers before 535 know only the older name
            reasons = _try(lambda: n.nvmlDeviceGetCurrentClocksThrottleReasons(handle))
        if reasons is not None:
            v["DCGM_FI_DEV_CLOCKS_EVENT_REASONS"] = float(reasons)
            v["DCGM_FI_DEV_CLOCK_THROTTLE_REASONS"] = float(reasons)
        if self.events is not None:
            v["DCGM_FI_DEV_XID_ERRORS"] = float(self.last_xid.get(index, 0))
        put("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", lambda: n.nvmlDeviceGetTotalEccErrors(
            handle, n.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, n.NVML_VOLATILE_ECC))
        put("DCGM_FI_DEV_RETIRED_DBE", lambda: len(n.nvmlDeviceGetRetiredPages(
            handle, n.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR)))
        nvlink = self._nvlink_kib(handle)
        if nvlink is not None:
            v["DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL"] = nvlink
        reading.processes = self._processes(handle)
        return reading

    def _nvlink_kib(self, handle: Any) -> float | None:
        n = self.nvml
        fields = [n.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX, n.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX]
        values = _try(lambda: n.nvmlDeviceGetFieldValues(handle, fields))
        if not values or any(fv.nvmlReturn != 0 for fv in values):
            return None  # a card without NVLink
        return float(sum(fv.value.ullVal for fv in values))

    def _processes(self, handle: Any) -> dict[int, int]:
        n = self.nvml
        found: dict[int, int] = {}
        for call in (n.nvmlDeviceGetComputeRunningProcesses, n.nvmlDeviceGetGraphicsRunningProcesses):
            for proc in _try(lambda call=call: call(handle)) or []:
                used = proc.usedGpuMemory  # None where the driver hides it (no permission)
                if used is not None:
                    found[int(proc.pid)] = max(found.get(int(proc.pid), 0), int(used))
        return found


def _try(read: Any) -> Any:
    try:
        return read()
    except Exception:
        return None


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
