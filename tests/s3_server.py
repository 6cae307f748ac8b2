"""A real S3 endpoint on 127.0.0.1 for tests: moto's server (``moto[server]``, a dev extra) in a
thread on a free port, with a bucket made through boto3, as a user's MinIO or Ceph would be.

pyarrow's ``S3FileSystem`` (what Ray Data reads S3 with, and what ``colorize --engine ray`` lists
and reads with) talks HTTP to it like to AWS: SigV4-signed requests, ListObjectsV2, ranged GETs.
The credentials are moto's test ones (moto accepts any); ``AWS_EC2_METADATA_DISABLED`` keeps the
AWS SDK from probing an instance role it would wait for.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


@contextmanager
def s3_environment(monkeypatch: Any, variable: str) -> Iterator[str]:
    """A running server, the test credentials set and ``variable`` (one of
    ``ENDPOINT_VARIABLES``, the other unset) pointing the AWS SDK at it; yields the endpoint."""
    with s3_server() as endpoint:
        for name, value in CREDENTIALS.items():
            monkeypatch.setenv(name, value)
        for name in ENDPOINT_VARIABLES:
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv(variable, endpoint)
        yield endpoint


@contextmanager
def s3_server() -> Iterator[str]:
    """A running moto S3 server; yields its endpoint URL ``http://127.0.0.1:<port>``."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def s3_client(endpoint: str) -> Any:
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=CREDENTIALS["AWS_REGION"],
        aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    )


def upload_folder(endpoint: str, folder: Path, bucket: str, prefix: str) -> list[str]:
    """Create ``bucket`` and put every file below ``folder`` at ``prefix/<relative path>``."""
    client = s3_client(endpoint)
    client.create_bucket(Bucket=bucket)
    keys = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        key = f"{prefix}/{path.relative_to(folder).as_posix()}"
        client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())
        keys.append(key)
    return keys
