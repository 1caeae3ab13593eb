"""How services listen. A port belongs to one process unless it is asked to share: gRPC turns
SO_REUSEPORT on by default on Linux, so a second server started on a taken port would bind
silently and take half of its new connections. Routers that are meant to share one public
address (`--share-port`) turn it on together; the kernel then spreads connections across them."""

from __future__ import annotations

import socket


def grpc_server_options(share_port: bool = False) -> list[tuple[str, int]]:
    """Options for `grpc.aio.server`: SO_REUSEPORT only when sharing the port is intended."""
    return [("grpc.so_reuseport", 1 if share_port else 0)]


def listening_socket(host: str, port: int, share_port: bool = False) -> socket.socket:
    """A bound TCP socket for an HTTP server (SO_REUSEADDR: a restart is not refused by the
    previous run's TIME_WAIT connections; SO_REUSEPORT only when sharing)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if share_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock
