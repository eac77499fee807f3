"""`soberana gateway --check` on a deployment's config, read on a host outside that deployment."""

from __future__ import annotations

import subprocess


def assert_valid_but_for_unresolvable_hosts(out: subprocess.CompletedProcess) -> None:
    """The config loads (exit 0), or loads with warnings (exit 1) that are only about
    service hostnames (`engine`, `<release>-engine`) that resolve inside the deployment, not
    here: --check cannot show such an `onprem` endpoint to be private, and says so."""
    assert out.returncode in (0, 1), out.stderr
    if out.returncode == 1:
        warnings = [line for line in out.stderr.splitlines() if line.startswith("warning:")]
        assert warnings, out.stderr
        assert all("does not resolve here" in w for w in warnings), out.stderr
