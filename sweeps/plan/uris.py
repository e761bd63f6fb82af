"""Tracking URIs: how they are printed (without credentials) and checked before a sweep
starts. Light on purpose: the checks run before MLflow itself is imported."""

from __future__ import annotations

import base64
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path


def redact(uri: str) -> str:
    """The URI without its credentials, fit to print or log. The user name goes too: a
    token is often given as the user name (``https://TOKEN@host``)."""
    parts = urllib.parse.urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    netloc = "***@" + parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def check_tracking_uri(uri: str, timeout: float = 5.0) -> None:
    """Fail in seconds, naming the URI, when the tracking server cannot be reached.

    Credentials in the URI (``http://user:password@host``) go to the server as HTTP basic
    authentication, as MLflow's own client sends them; a server that refuses them is
    reachable, and the message says the credentials were refused."""
    from sweeps.errors import UsageError

    parts = urllib.parse.urlsplit(uri)
    if parts.scheme in ("http", "https"):
        bare = urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
        request = urllib.request.Request(bare.rstrip("/") + "/health")
        if parts.username is not None or parts.password is not None:
            user = urllib.parse.unquote(parts.username or "")
            secret = urllib.parse.unquote(parts.password or "")
            request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{secret}".encode()).decode())
        try:
            with urllib.request.urlopen(request, timeout=timeout) as r:
                r.read()
        except urllib.error.HTTPError as e:
            if e.code in (401, 403):
                raise UsageError(f"MLflow tracking server {redact(uri)} refused the credentials "
                                 f"(HTTP {e.code}); check the user name and password in --tracking-uri") from None
            raise UsageError(f"MLflow tracking server {redact(uri)} answered HTTP {e.code} at /health; "
                             "is it an MLflow server?") from None
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            raise UsageError(f"MLflow tracking server {redact(uri)} is unreachable ({reason}); "
                             "start it or pass another --tracking-uri") from None
    elif parts.scheme == "sqlite":
        folder = Path(uri.removeprefix("sqlite:///")).expanduser().resolve().parent
        if not folder.is_dir():
            raise UsageError(f"--tracking-uri {uri}: folder {folder} does not exist")
