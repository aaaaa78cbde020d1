"""Loaded by every Python process of the remote-storage tests (PYTHONPATH): refuses any socket connection
that is not to 127.0.0.1/localhost or a UNIX socket, so no test can reach a real network service (AWS)."""
import socket

_ALLOWED = {"127.0.0.1", "localhost", "::1"}


def _check(address):
    if isinstance(address, tuple) and address and address[0] not in _ALLOWED:
        raise ConnectionRefusedError(f"tests/netguard: connection to {address!r} refused (tests may only "
                                     "talk to 127.0.0.1)")


_connect, _connect_ex = socket.socket.connect, socket.socket.connect_ex


def connect(self, address):
    _check(address)
    return _connect(self, address)


def connect_ex(self, address):
    _check(address)
    return _connect_ex(self, address)


socket.socket.connect, socket.socket.connect_ex = connect, connect_ex
