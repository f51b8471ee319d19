"""Free local TCP ports for rendezvous, chosen where no outgoing connection can take them.

Kept free of torch, so that the launcher (``megatron_ext.launch.plan``) can use it.
"""

from __future__ import annotations

import random
import socket

EPHEMERAL_RANGE_FILE = "/proc/sys/net/ipv4/ip_local_port_range"
LISTEN_PORTS_BELOW = 12000
"""How many ports under the ephemeral range ``find_free_port`` draws from."""


def find_free_port(ephemeral_range_file: str = EPHEMERAL_RANGE_FILE) -> int:
    """A free local TCP port for a rendezvous, outside the kernel's ephemeral port range.

    The port is free when chosen, not reserved: rank 0 listens on it only once the processes have
    started, or in a later phase minutes later. A port from the ephemeral range (what binding port
    0 gives) may by then have been taken by any outgoing connection on the machine, gloo's own
    among them; a port below that range is only ever taken by an explicit listen. So it is drawn
    at random from the ``LISTEN_PORTS_BELOW`` ports under the range (with a generator of its own,
    so that callers' seeds do not make processes draw alike) and checked free. Where the range
    is unknown or starts too low for that, the kernel picks.
    """

    def free(port: int) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                return False
            return True

    try:
        with open(ephemeral_range_file) as handle:
            low = int(handle.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 0
    if low - LISTEN_PORTS_BELOW >= 1024:
        draw = random.Random()  # seeded from the OS, whatever the caller seeded
        for _ in range(100):
            port = draw.randrange(low - LISTEN_PORTS_BELOW, low)
            if free(port):
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def find_free_ports(count: int) -> list[int]:
    """``count`` distinct ``find_free_port`` ports, for process groups formed one after another
    (a rank done with one phase may already be knocking on the next phase's port)."""
    ports: list[int] = []
    while len(ports) < count:
        port = find_free_port()
        if port not in ports:
            ports.append(port)
    return ports
