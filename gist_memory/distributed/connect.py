"""Reaching a Ray cluster: check an address before Ray is imported (a wrong one fails in seconds, not minutes),
then connect to it or start a local one. Nothing here imports Ray at module level."""

from __future__ import annotations

import logging
import os
import re
import socket
from typing import Any, Optional

CONNECT_TIMEOUT_S = 5.0
_HOST_PORT = re.compile(r"^(?P<host>\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.\-]+):(?P<port>\d{1,5})$")


def check_address(address: Optional[str]) -> Optional[str]:
    """Validate a Ray address and, for a remote one, that something listens there (a few seconds at most).

    Args:
        address: None or "local" (start a local Ray), "auto" (the cluster this machine belongs to),
            "ray://host:port" (Ray Client) or "host:port" (a cluster's GCS, as `ray start --head` prints it).

    Returns:
        The address to give `ray.init` (None: start a local Ray).

    Raises:
        ValueError: Not a Ray address (a file path, say).
        ConnectionError: Nothing answers at host:port.
    """
    if address is None or address == "local":
        return None
    if address == "auto":
        return address
    rest = address[len("ray://"):] if address.startswith("ray://") else address
    m = _HOST_PORT.match(rest)
    if m is None:
        hint = " (a path? give the files before --ray, or write --ray local)" if os.path.exists(address) else ""
        raise ValueError(f"{address!r} is not a Ray address: use local, auto, ray://HOST:PORT or HOST:PORT{hint}")
    host, port = m.group("host").strip("[]"), int(m.group("port"))
    if not 0 < port < 65536:
        raise ValueError(f"{address!r}: the port must be 1-65535")
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as e:
        raise ConnectionError(f"no Ray cluster answers at {address} ({e.strerror or e}); start one there with "
                              f"`ray start --head`, or check the address and port") from None
    return address


def connect(address: Optional[str]) -> bool:
    """Connect to the cluster at `address` (see `check_address`), or start a local Ray, unless this process is
    connected already. Returns True if this call connected (the caller then calls `ray.shutdown()`)."""
    import ray

    if ray.is_initialized():
        return False
    target = check_address(address)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    kw: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
    try:
        if target is None:
            ray.init(**kw)
        else:
            ray.init(address=target, **kw)
    except ConnectionError as e:
        raise ConnectionError(f"could not connect to the Ray cluster at {address}: {e}") from e
    return True
