"""Rendezvous ports: drawn below the kernel's ephemeral range, free, and not alike across seeds."""

from __future__ import annotations

import random
import socket

from megatron_ext.parallel import ports
from megatron_ext.parallel.ports import LISTEN_PORTS_BELOW, find_free_port, find_free_ports


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def test_port_is_free_and_below_the_ephemeral_range(tmp_path):
    ranges = tmp_path / "ip_local_port_range"
    ranges.write_text("32768\t60999\n")
    for _ in range(20):
        port = find_free_port(str(ranges))
        assert 32768 - LISTEN_PORTS_BELOW <= port < 32768
        assert _bindable(port)


def test_a_port_in_use_is_never_returned(tmp_path, monkeypatch):
    monkeypatch.setattr(ports, "LISTEN_PORTS_BELOW", 10)
    ranges = tmp_path / "ip_local_port_range"
    ranges.write_text("20010 60999")  # ten candidates: 20000..20009
    free, listeners = None, []
    try:
        for port in range(20000, 20010):
            if free is None and _bindable(port):
                free = port  # the one candidate left free
                continue
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.bind(("127.0.0.1", port))
                sock.listen()
                listeners.append(sock)
            except OSError:  # in use already
                sock.close()
        assert free is not None
        assert {find_free_port(str(ranges)) for _ in range(30)} == {free}
    finally:
        for sock in listeners:
            sock.close()


def test_callers_seeds_do_not_make_processes_draw_alike(tmp_path):
    ranges = tmp_path / "ip_local_port_range"
    ranges.write_text("32768 60999")
    draws = []
    for _ in range(3):
        random.seed(0)  # as every rank of a seeded test would
        draws.append(find_free_port(str(ranges)))
    assert len(set(draws)) > 1


def test_unknown_or_low_range_leaves_the_choice_to_the_kernel(tmp_path):
    low = tmp_path / "low"
    low.write_text("2000 60999")
    for source in (str(low), str(tmp_path / "missing"), str(tmp_path)):
        port = find_free_port(source)
        assert _bindable(port)


def test_ports_for_phases_are_distinct():
    ports = find_free_ports(8)
    assert len(set(ports)) == 8
