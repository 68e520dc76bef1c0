"""Loopback ports for the servers this project starts: free, distinct, and outside the ranges where another socket
(any port-0 bind, or a Ray worker) could take one before the server binds it."""

from __future__ import annotations

import socket

from ppd_ray.infra.processes import ephemeral_port_range, free_ports


def test_free_ports_are_distinct_bindable_and_outside_the_ephemeral_and_ray_worker_ranges():
    low, high = ephemeral_port_range()
    ports = free_ports(9)  # what a local Ray head asks for
    assert len(set(ports)) == 9
    assert all(not low <= port <= high and not 10002 <= port <= 19999 for port in ports)
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))  # raises if a port was left held or was never free


def test_a_port_zero_bind_never_lands_in_the_chosen_range():
    # the reason for the range: what the kernel hands out for port 0 lies inside ephemeral_port_range()
    low, high = ephemeral_port_range()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        assert low <= sock.getsockname()[1] <= high
