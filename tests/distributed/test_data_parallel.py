"""`--data-parallel-size`: each replica's arguments, GPUs, and the gateway config."""

from __future__ import annotations

from soberana.distributed.data_parallel import gateway_config, replica_argv, replica_devices
from soberana.gateway.config_loader import parse_config


def test_replica_argv_takes_its_own_port_and_no_data_parallel():
    argv = ["/m/llama", "--port", "9000", "--data-parallel-size=2", "--tensor-parallel-size",
            "2", "--host", "0.0.0.0"]
    assert replica_argv(argv, 1, 9000) == ["/m/llama", "--tensor-parallel-size", "2",
                                           "--host", "0.0.0.0", "--port", "9001"]


def test_replicas_get_disjoint_gpus():
    assert [replica_devices(i, 2) for i in range(4)] == ["0,1", "2,3", "4,5", "6,7"]


def test_gateway_config_is_valid_and_routes_by_prefix_affinity():
    tenant = ("tenants:\n  - name: t\n    key_sha256: [" + "ab" * 32 + "]\n"
              "    models: [llama]\n")
    cfg = parse_config(gateway_config("llama", "127.0.0.1", 9000, 3) + tenant)
    backends = cfg.models["llama"].backends
    assert [b.endpoint.rstrip("/") for b in backends] == [
        f"http://127.0.0.1:{9000 + i}" for i in range(3)]  # the loader drops the /v1
    assert cfg.routing.prefix_affinity
