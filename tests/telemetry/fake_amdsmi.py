"""amdsmi replaced at the library boundary: the calls AMDSMIReader makes, answering in the
shapes ROCm's amdsmi Python API documents (dicts, MB for VRAM, bytes per process, "N/A" for a
reading the card lacks). There is no AMD card on any machine of this project to record from,
so the values are an MI300X's published figures, not a recording."""

from __future__ import annotations

from enum import Enum

MIB = 2**20


class AmdSmiTemperatureType(Enum):
    EDGE = 0
    HOTSPOT = 1


class AmdSmiTemperatureMetric(Enum):
    CURRENT = 0


class AmdSmiClkType(Enum):
    GFX = 0
    MEM = 1


class AmdSmiException(Exception):
    pass


class FakeAMDSMI:
    """Two MI300X; `broken` makes amdsmi_init fail as it does without the amdgpu driver."""

    AmdSmiTemperatureType = AmdSmiTemperatureType
    AmdSmiTemperatureMetric = AmdSmiTemperatureMetric
    AmdSmiClkType = AmdSmiClkType

    def __init__(self, broken: bool = False) -> None:
        self.broken = broken
        self.initialised = False
        self.vram_used_mb = [61_440, 1_024]
        self.processes = {0: [{"pid": 4242, "memory_usage": {"vram_mem": 60 * 1024 * MIB}}], 1: []}

    def amdsmi_init(self) -> None:
        if self.broken:
            raise AmdSmiException("AMDSMI_STATUS_DRIVER_NOT_LOADED")
        self.initialised = True

    def amdsmi_shut_down(self) -> None:
        self.initialised = False

    def amdsmi_get_processor_handles(self) -> list[int]:
        return [0, 1]

    def amdsmi_get_gpu_asic_info(self, h: int) -> dict:
        return {"market_name": "AMD Instinct MI300X", "vendor_id": "0x1002"}

    def amdsmi_get_gpu_device_uuid(self, h: int) -> str:
        return f"1fff74a1-0000-1000-80ab-c6f7d3e0e0{h:02d}"

    def amdsmi_get_gpu_device_bdf(self, h: int) -> str:
        return f"0000:{0x0c + h:02x}:00.0"

    def amdsmi_get_gpu_vram_usage(self, h: int) -> dict:
        return {"vram_total": 196_592, "vram_used": self.vram_used_mb[h]}

    def amdsmi_get_temp_metric(self, h, kind, metric) -> int:
        assert kind is AmdSmiTemperatureType.HOTSPOT and metric is AmdSmiTemperatureMetric.CURRENT
        return 48 + h

    def amdsmi_get_power_info(self, h: int) -> dict:
        # MI300X reports the socket's current power; an older card only the average: "N/A".
        if h == 0:
            return {"current_socket_power": 312, "average_socket_power": "N/A"}
        return {"current_socket_power": "N/A", "average_socket_power": 140}

    def amdsmi_get_gpu_activity(self, h: int) -> dict:
        return {"gfx_activity": 97 if h == 0 else 0, "umc_activity": 41 if h == 0 else "N/A",
                "mm_activity": "N/A"}

    def amdsmi_get_clock_info(self, h: int, clk: AmdSmiClkType) -> dict:
        return {"clk": 2100 if clk is AmdSmiClkType.GFX else 1300, "min_clk": 500, "max_clk": 2100}

    def amdsmi_get_gpu_total_ecc_count(self, h: int) -> dict:
        if h == 1:
            raise AmdSmiException("AMDSMI_STATUS_NOT_SUPPORTED")
        return {"correctable_count": 3, "uncorrectable_count": 0}

    def amdsmi_get_gpu_process_list(self, h: int) -> list[dict]:
        return self.processes[h]
