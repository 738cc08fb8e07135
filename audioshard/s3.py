"""Read build files from S3 and S3-compatible stores (MinIO, R2, Ceph...): the s3:// half of remote.py.

Only what differs from HTTP lives here: the client and the meaning of its errors. Checks, retries,
the cache and the integrity rules are remote.Fetcher's, the same for every remote source.

The client is boto3's, configured the standard way (nothing audioshard-specific): credentials from
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, a profile (AWS_PROFILE,
~/.aws/config) or an instance role; the region from AWS_DEFAULT_REGION; another store's endpoint
from AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3). boto3 is an optional extra: `pip install -e '.[s3]'` from a checkout.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator

from audioshard.errors import SourceError, TransientError

# Errors the store itself calls temporary (S3 documents these for retrying with backoff).
TRANSIENT_CODES = {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "RequestTimeTooSkewed",
                   "ThrottlingException", "Throttling", "RequestLimitExceeded"}
TRANSIENT_STATUS = {408, 425, 429, 500, 502, 503, 504}
# Environment that selects the client; part of the cache key so that a changed environment gets a new client.
CLIENT_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID")


def split(location: str) -> tuple[str, str]:
    """('bucket', 'key/of/object') of 's3://bucket/key/of/object'."""
    bucket, _, key = location.removeprefix("s3://").partition("/")
    if not bucket or not key:
        raise SourceError(f"{location}: an s3:// location is s3://BUCKET/KEY (for a build: s3://BUCKET/PREFIX/)")
    return bucket, key


@contextlib.contextmanager
def object_body(location: str, timeout: float) -> Iterator[tuple[int, Callable[[int], bytes]]]:
    """(Content-Length, read(n)) of one object; the store's errors become SourceError (permanent: 403, 404,
    no credentials) or TransientError (5xx, throttling, a dropped or timed-out connection, a short body)."""
    from botocore.exceptions import BotoCoreError, ClientError, IncompleteReadError, NoCredentialsError

    bucket, key = split(location)
    try:
        body = None
        response = _client(timeout, *_client_env()).get_object(Bucket=bucket, Key=key)
        body = response["Body"]
        yield int(response.get("ContentLength") or 0), body.read
    except ClientError as exn:
        raise _client_error(location, exn) from exn
    except NoCredentialsError as exn:
        raise SourceError(f"{location}: no S3 credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                          "(or AWS_PROFILE)") from exn
    except IncompleteReadError as exn:  # the body ended before its Content-Length: a truncated download
        raise TransientError(f"truncated download ({exn})", integrity=True) from exn
    except BotoCoreError as exn:  # connection refused, reset or timed out
        raise TransientError(f"S3 read failed ({exn})") from exn
    finally:
        if body is not None:
            body.close()


def client(timeout: float):
    """This process's client for `timeout` and the AWS_* environment (cached; see `_client`): for every s3://
    request audioshard makes, reads, listings and uploads alike."""
    return _client(timeout, *_client_env())


@contextlib.contextmanager
def errors(location: str) -> Iterator[None]:
    """The store's errors around one request, worded as for reads: SourceError (403, 404, no credentials)
    or TransientError (5xx, throttling, a dropped connection): retried by the caller."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    try:
        yield
    except ClientError as exn:
        raise _client_error(location, exn) from exn
    except NoCredentialsError as exn:
        raise SourceError(f"{location}: no S3 credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                          "(or AWS_PROFILE)") from exn
    except BotoCoreError as exn:  # connection refused, reset or timed out
        raise TransientError(f"S3 request failed ({exn})") from exn


def head(location: str, timeout: float) -> tuple[int, str]:
    """(size, ETag) of one object, before it is read."""
    bucket, key = split(location)
    with errors(location):
        found = client(timeout).head_object(Bucket=bucket, Key=key)
    return int(found.get("ContentLength") or 0), str(found.get("ETag", "")).strip('"')


def _client_error(location: str, exn) -> Exception:
    error = exn.response.get("Error", {})
    code, message = str(error.get("Code", "")), str(error.get("Message", ""))
    status = exn.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    if code in TRANSIENT_CODES or status in TRANSIENT_STATUS:
        return TransientError(f"S3 {status} {code}")
    hints = {"NoSuchKey": "is the prefix right, and was the whole build uploaded (`aws s3 sync BUILD s3://...`)?",
             "NoSuchBucket": "is the bucket name right, and AWS_ENDPOINT_URL the store that holds it?",
             "AccessDenied": "do these credentials (AWS_ACCESS_KEY_ID / AWS_PROFILE) have s3:GetObject on it?"}
    hint = hints.get(code, "check the location, credentials and AWS_ENDPOINT_URL")
    return SourceError(f"{location}: S3 {status} {code}{': ' + message if message else ''}; {hint}")


def _client_env() -> tuple[str, ...]:
    return tuple(os.environ.get(name, "") for name in CLIENT_ENV)


@functools.lru_cache(maxsize=8)
def _client(timeout: float, *env: str):
    """One client per process, timeout and environment: creating one costs ~50 ms, so shards share it. It is
    made in the process that uses it (a loader worker makes its own) because a client is not fork-safe, and
    the cache is cleared in a forked child (see below)."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError as exn:
        raise SourceError("s3:// sources need boto3: pip install boto3 (from a checkout: pip install -e '.[s3]')") \
            from exn
    # Retries are remote.Fetcher's (the same backoff and counts as HTTP), so botocore makes one attempt.
    config = Config(connect_timeout=timeout, read_timeout=timeout, retries={"total_max_attempts": 1})
    return boto3.session.Session().client("s3", config=config)


os.register_at_fork(after_in_child=_client.cache_clear)
