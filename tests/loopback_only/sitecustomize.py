"""Tests talk to 127.0.0.1 only: in every Python process the tests start (this directory is
first on their PYTHONPATH, see job_support.subprocess_env) and in pytest itself (conftest),
a TCP/UDP connection anywhere else fails before a packet is sent."""
import socket

LOOPBACK = ("127.0.0.1", "::1", "localhost")
_connect, _connect_ex = socket.socket.connect, socket.socket.connect_ex


def _check(sock: socket.socket, address: object) -> None:
    if sock.family in (socket.AF_INET, socket.AF_INET6) and isinstance(address, tuple) and address[0] not in LOOPBACK:
        raise ConnectionRefusedError(f"test guard: no connection to {address[0]} (tests talk to 127.0.0.1 only)")


def _guarded_connect(self: socket.socket, address: object) -> None:
    _check(self, address)
    return _connect(self, address)


def _guarded_connect_ex(self: socket.socket, address: object) -> int:
    _check(self, address)
    return _connect_ex(self, address)


socket.socket.connect = _guarded_connect  # type: ignore[method-assign]
socket.socket.connect_ex = _guarded_connect_ex  # type: ignore[method-assign]
