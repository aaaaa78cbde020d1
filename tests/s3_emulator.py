"""An S3 endpoint for tests: moto's standalone server, started in the test process on 127.0.0.1.

It is an emulator, not AWS: it speaks the S3 REST API (PUT/GET/LIST/DELETE, conditional PUT with
If-None-Match) to s3fs and botocore, which is what dcp-resume's fsspec path uses. Every process of these
tests gets the endpoint and dummy credentials through the standard AWS_* variables, and
tests/netguard/sitecustomize.py on PYTHONPATH refuses any connection that is not to 127.0.0.1.
"""
from __future__ import annotations

import contextlib
import logging
import os
import runpy
import socket
import uuid

NETGUARD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "netguard")


class S3Emulator:
    def __init__(self):
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        self.env = {
            "AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
            "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
            "PYTHONPATH": os.pathsep.join(p for p in (NETGUARD, os.environ.get("PYTHONPATH")) if p),
        }

    def apply_env(self) -> dict[str, str | None]:
        """Point this process at the emulator; returns what to restore."""
        saved = {k: os.environ.get(k) for k in [*self.env, "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"]}
        for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
            os.environ.pop(k, None)
        os.environ.update(self.env)
        return saved

    def new_bucket(self) -> str:
        import boto3

        name = f"ckpt-{uuid.uuid4().hex[:12]}"
        boto3.client("s3", endpoint_url=self.endpoint).create_bucket(Bucket=name)
        return name

    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(use_listings_cache=False, skip_instance_cache=True,
                                 client_kwargs={"endpoint_url": self.endpoint})

    def stop(self) -> None:
        self._server.stop()


@contextlib.contextmanager
def running():
    """An emulator this process and its children point at (AWS_* variables), with this process too confined
    to 127.0.0.1 (netguard); everything is put back and the server stopped on exit."""
    emu = S3Emulator()
    saved_env = emu.apply_env()
    connect, connect_ex = socket.socket.connect, socket.socket.connect_ex
    runpy.run_path(f"{NETGUARD}/sitecustomize.py")
    try:
        yield emu
    finally:
        socket.socket.connect, socket.socket.connect_ex = connect, connect_ex
        restore_env(saved_env)
        emu.stop()


def restore_env(saved: dict[str, str | None]) -> None:
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
