"""Run a command against a local S3 emulator (moto's standalone server on 127.0.0.1), without AWS.

    python benchmarks/run_with_s3_emulator.py -- torchrun --nproc_per_node 2 benchmarks/save_latency.py \\
        --sizes 32 --save-dir s3://bench/run --out runs/bench_s3

Starts moto's ThreadedMotoServer in this process on 127.0.0.1 (a free port), creates the bucket(s)
(--bucket, default "bench"), then runs the command as a subprocess with AWS_ENDPOINT_URL, dummy credentials
and NO_PROXY set, so torchrun's workers inherit them and s3fs/botocore talk to the emulator. Stops the
server when the command ends and exits with its status.

It is an emulator, not AWS: objects live in this process's memory (large ones spill to temporary files),
one Python process serves every request, and the network is loopback. What a benchmark measures through it
is the protocol's cost on this machine (HTTP, PUT/GET/LIST, multipart uploads, reading shards back to hash
them), not S3's throughput or latency.
"""
from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys


def start(buckets: list[str]):
    """(server, environment for the command): the emulator, running, with the buckets created."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
           "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                          aws_secret_access_key="testing")
    for b in buckets:
        client.create_bucket(Bucket=b)
    return server, env


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        print(__doc__, file=sys.stderr)
        return 2
    split = argv.index("--")
    p = argparse.ArgumentParser(description="Run a command against moto's S3 emulator on 127.0.0.1")
    p.add_argument("--bucket", action="append", help="bucket to create (repeatable; default: bench)")
    a = p.parse_args(argv[:split])
    cmd = argv[split + 1:]
    if not cmd:
        p.error("no command after --")
    server, env = start(a.bucket or ["bench"])
    print(f"run_with_s3_emulator: moto S3 emulator (not AWS) at {env['AWS_ENDPOINT_URL']}, buckets "
          f"{', '.join(a.bucket or ['bench'])}", file=sys.stderr, flush=True)
    full = {k: v for k, v in os.environ.items() if k not in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")}
    try:
        return subprocess.run(cmd, env={**full, **env}).returncode
    except KeyboardInterrupt:
        return 130
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
