"""A real S3-compatible server on loopback for the storage tests: moto's server mode in a subprocess."""
from __future__ import annotations

import socket
import subprocess
import sys
import time
from contextlib import contextmanager

ACCESS_KEY, SECRET_KEY = "nextscale-test-key-id", "nextscale-test-secret-value"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def s3_server(timeout: float = 30.0):
    """Yields the endpoint "127.0.0.1:PORT"; the server is killed on exit."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start on port {port}") from None
                time.sleep(0.1)
        yield f"127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait()


def bucket_uri(endpoint: str, bucket: str, path: str = "runs") -> str:
    return (f"s3://{bucket}/{path}?endpoint_override={endpoint}&scheme=http&region=us-east-1"
            f"&allow_bucket_creation=true")


def credentials_env() -> dict[str, str]:
    return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_EC2_METADATA_DISABLED": "true"}
