"""An S3 endpoint for tests: moto's S3 server on loopback, one per test session. pyarrow talks to it through the
standard AWS variables (AWS_ENDPOINT_URL among them), exactly as it would to MinIO or to AWS itself, so the
engine's object-store code paths run unchanged; a subprocess given `env` reaches the same bucket."""

from __future__ import annotations

import os
from contextlib import contextmanager

BUCKET = "ddoq-test"


@contextmanager
def s3_endpoint():
    """-> {variable: value} for AWS_* plus "bucket"; os.environ holds the variables while the server runs."""
    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    variables = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
                 "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
                 "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in variables}
    os.environ.update(variables)
    try:
        pafs.FileSystem.from_uri(f"s3://{BUCKET}?allow_bucket_creation=true")[0].create_dir(BUCKET)
        yield {**variables, "bucket": BUCKET}
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()
