"""Port and address checks before binding: one line that names the setting."""

from __future__ import annotations

import pytest

from cellserve.server.ports import check_free

NOT_OURS = "192.0.2.1"  # TEST-NET-1 (RFC 5737): never an address of this machine


@pytest.mark.parametrize(("setting", "flag"), [("port", "--host"), ("metrics_port", "--metrics-host")])
@pytest.mark.parametrize("port", [0, 50999])
def test_a_host_that_is_not_this_machines_is_named_with_its_flag(setting, flag, port):
    with pytest.raises(OSError) as e:
        check_free(NOT_OURS, port, setting)
    assert str(e.value).startswith(f"{NOT_OURS} is not an address of this machine (set by {flag})")
