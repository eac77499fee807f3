"""AMD GPUs through amdsmi (ROCm's Python library), under the DCGM names where a field exists.

Used only where `amdsmi` is installed. Field by field the mapping is in fields.py (`amdsmi`);
fields AMD does not report (clock event reasons, XID, retired pages, NVLink) give no series.
"""

from __future__ import annotations

import logging
from types import ModuleType
from typing import Any

from soberana.telemetry.reading import GPUReading

logger = logging.getLogger("soberana.telemetry")


class AMDSMIReader:
    """Reads every AMD GPU amdsmi shows; `available` is False without library, driver or GPU."""

    def __init__(self, amdsmi: ModuleType | None = None) -> None:
        self.smi: Any = amdsmi
        self.handles: list[Any] = []
        self.available = False
        try:
            if self.smi is None:
                import amdsmi as module

                self.smi = module
            self.smi.amdsmi_init()
            self.handles = list(self.smi.amdsmi_get_processor_handles())
        except Exception as exc:
            logger.debug("amdsmi unavailable: %s", exc)
            return
        self.available = bool(self.handles)

    def close(self) -> None:
        if self.available:
            self.smi.amdsmi_shut_down()
            self.available = False

    def read(self) -> list[GPUReading]:
        if not self.available:
            return []
        return [self._read_one(i, h) for i, h in enumerate(self.handles)]

    def _read_one(self, index: int, handle: Any) -> GPUReading:
        s = self.smi
        asic = _try(lambda: s.amdsmi_get_gpu_asic_info(handle)) or {}
        reading = GPUReading(
            gpu=index,
            uuid=str(_try(lambda: s.amdsmi_get_gpu_device_uuid(handle)) or ""),
            model_name=str(asic.get("market_name", "")),
            pci_bus_id=str(_try(lambda: s.amdsmi_get_gpu_device_bdf(handle)) or ""),
            device=f"amdgpu{index}",
        )
        v = reading.values
        vram = _try(lambda: s.amdsmi_get_gpu_vram_usage(handle))
        if vram:  # MB, as amdsmi reports it
            v["DCGM_FI_DEV_FB_TOTAL"] = float(vram["vram_total"])
            v["DCGM_FI_DEV_FB_USED"] = float(vram["vram_used"])
            v["DCGM_FI_DEV_FB_FREE"] = float(vram["vram_total"] - vram["vram_used"])
        temp = _try(lambda: s.amdsmi_get_temp_metric(
            handle, s.AmdSmiTemperatureType.HOTSPOT, s.AmdSmiTemperatureMetric.CURRENT))
        if isinstance(temp, int | float):
            v["DCGM_FI_DEV_GPU_TEMP"] = float(temp)
        power = _try(lambda: s.amdsmi_get_power_info(handle)) or {}
        watts = _number(power.get("current_socket_power")) or _number(power.get("average_socket_power"))
        if watts is not None:
            v["DCGM_FI_DEV_POWER_USAGE"] = watts
        activity = _try(lambda: s.amdsmi_get_gpu_activity(handle)) or {}
        for key, name in (("gfx_activity", "DCGM_FI_DEV_GPU_UTIL"),
                          ("umc_activity", "DCGM_FI_DEV_MEM_COPY_UTIL")):
            if _number(activity.get(key)) is not None:
                v[name] = _number(activity[key])
        for clk, name in (("GFX", "DCGM_FI_DEV_SM_CLOCK"), ("MEM", "DCGM_FI_DEV_MEM_CLOCK")):
            info = _try(lambda clk=clk: s.amdsmi_get_clock_info(handle, getattr(s.AmdSmiClkType, clk)))
            if info and _number(info.get("clk")) is not None:
                v[name] = _number(info["clk"])
        ecc = _try(lambda: s.amdsmi_get_gpu_total_ecc_count(handle))
        if ecc and _number(ecc.get("uncorrectable_count")) is not None:
            v["DCGM_FI_DEV_ECC_DBE_VOL_TOTAL"] = _number(ecc["uncorrectable_count"])
        for proc in _try(lambda: s.amdsmi_get_gpu_process_list(handle)) or []:
            if isinstance(proc, dict) and "pid" in proc:
                vram_bytes = (proc.get("memory_usage") or {}).get("vram_mem")
                if _number(vram_bytes) is not None:
                    reading.processes[int(proc["pid"])] = int(vram_bytes)
        return reading


def _number(value: Any) -> float | None:
    """amdsmi reports "N/A" for fields a card lacks."""
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _try(read: Any) -> Any:
    try:
        return read()
    except Exception:
        return None
