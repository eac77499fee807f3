"""The DCGM fields Soberana exports: name, Prometheus type, help text and where the value comes from.

Names, units and types follow dcgm-exporter's default-counters.csv, so its dashboards and alert
rules read these series unchanged. `source` is what docs/telemetry.md lists per field.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Field:
    name: str
    kind: str  # "gauge" or "counter", as dcgm-exporter declares it
    help: str
    nvml: str  # the NVML call that fills it
    amdsmi: str | None  # the amdsmi call that fills it on AMD GPUs; None: no such reading


FIELDS: tuple[Field, ...] = (
    Field("DCGM_FI_DEV_FB_USED", "gauge", "Framebuffer memory used (in MiB).",
          "nvmlDeviceGetMemoryInfo().used", "amdsmi_get_gpu_vram_usage()['vram_used']"),
    Field("DCGM_FI_DEV_FB_FREE", "gauge", "Framebuffer memory free (in MiB).",
          "nvmlDeviceGetMemoryInfo().free", "vram_total - vram_used"),
    Field("DCGM_FI_DEV_FB_TOTAL", "gauge", "Framebuffer memory total (in MiB).",
          "nvmlDeviceGetMemoryInfo().total", "amdsmi_get_gpu_vram_usage()['vram_total']"),
    Field("DCGM_FI_DEV_FB_RESERVED", "gauge", "Framebuffer memory reserved (in MiB).",
          "nvmlDeviceGetMemoryInfo(version=nvmlMemory_v2).reserved", None),
    Field("DCGM_FI_DEV_GPU_TEMP", "gauge", "GPU temperature (in C).",
          "nvmlDeviceGetTemperature(NVML_TEMPERATURE_GPU)",
          "amdsmi_get_temp_metric(HOTSPOT, CURRENT)"),
    Field("DCGM_FI_DEV_POWER_USAGE", "gauge", "Power draw (in W).",
          "nvmlDeviceGetPowerUsage() / 1000", "amdsmi_get_power_info()['current_socket_power']"),
    Field("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "counter",
          "Total energy consumption since boot (in mJ).",
          "nvmlDeviceGetTotalEnergyConsumption()", None),
    Field("DCGM_FI_DEV_GPU_UTIL", "gauge", "GPU utilization (in %).",
          "nvmlDeviceGetUtilizationRates().gpu", "amdsmi_get_gpu_activity()['gfx_activity']"),
    Field("DCGM_FI_DEV_MEM_COPY_UTIL", "gauge", "Memory utilization (in %).",
          "nvmlDeviceGetUtilizationRates().memory", "amdsmi_get_gpu_activity()['umc_activity']"),
    Field("DCGM_FI_DEV_SM_CLOCK", "gauge", "SM clock frequency (in MHz).",
          "nvmlDeviceGetClockInfo(NVML_CLOCK_SM)", "amdsmi_get_clock_info(GFX)['clk']"),
    Field("DCGM_FI_DEV_MEM_CLOCK", "gauge", "Memory clock frequency (in MHz).",
          "nvmlDeviceGetClockInfo(NVML_CLOCK_MEM)", "amdsmi_get_clock_info(MEM)['clk']"),
    Field("DCGM_FI_DEV_CLOCKS_EVENT_REASONS", "gauge",
          "Current clock event reasons (bitmask of nvmlClocksEventReason*).",
          "nvmlDeviceGetCurrentClocksEventReasons()", None),
    Field("DCGM_FI_DEV_CLOCK_THROTTLE_REASONS", "gauge",
          "Current clock throttle reasons (the older name of DCGM_FI_DEV_CLOCKS_EVENT_REASONS).",
          "nvmlDeviceGetCurrentClocksEventReasons()", None),
    Field("DCGM_FI_DEV_XID_ERRORS", "gauge",
          "Value of the last XID error encountered (0: none since the exporter started).",
          "nvmlEventSetWait(nvmlEventTypeXidCriticalError)", None),
    Field("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", "counter",
          "Total number of double-bit volatile ECC errors.",
          "nvmlDeviceGetTotalEccErrors(UNCORRECTED, VOLATILE_ECC)",
          "amdsmi_get_gpu_total_ecc_count()['uncorrectable_count']"),
    Field("DCGM_FI_DEV_RETIRED_DBE", "counter",
          "Total number of retired pages due to double-bit errors.",
          "nvmlDeviceGetRetiredPages(DOUBLE_BIT_ECC_ERROR)", None),
    Field("DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL", "counter",
          "Total NVLink data throughput of all links, received plus transmitted (in KiB).",
          "nvmlDeviceGetFieldValues(NVLINK_THROUGHPUT_DATA_TX + _RX)", None),
)

BY_NAME = {f.name: f for f in FIELDS}

# The bits of DCGM_FI_DEV_CLOCKS_EVENT_REASONS that mean the card is slowed by heat or power
# (nvmlClocksEventReason{SwPowerCap 0x4, HwSlowdown 0x8, SwThermalSlowdown 0x20,
# HwThermalSlowdown 0x40, HwPowerBrakeSlowdown 0x80}); idle (0x1) and sync boost (0x10) are not.
THROTTLE_MASK = 0x4 | 0x8 | 0x20 | 0x40 | 0x80
