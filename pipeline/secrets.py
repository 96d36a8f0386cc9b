"""Credentials given in URIs stay inside the process.

A URI with ``user:password@`` before its host (or ``...?token=...``) is accepted: the process
keeps the credentials where the client libraries look for them (MLflow's
``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD``; for any other URI the environment
variable ``PIPELINE_URI_CREDENTIALS``, read back by :func:`with_credentials`), and the value the
config holds from then on has none. Everything the pipeline writes (the config file, MLflow
params and tags, ``result.json``, log lines, stdout, the pickle of a submitted job) therefore
starts from a clean value, and :func:`redact` scrubs free text as a second line of defence.
A job submitted to Slurm inherits the submitting process's environment, credentials included.

Credentials belong in the environment or in the tools' own credential files
(``~/.mlflow/credentials``, ``~/.aws/credentials``), never in a config.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from typing import Any
from urllib.parse import unquote

log = logging.getLogger("pipeline.secrets")

MASK = "***"
# Where URIs that are not MLflow's keep their credentials; a submitted job inherits it.
ENV_KEEP = "PIPELINE_URI_CREDENTIALS"
MLFLOW_USERNAME = "MLFLOW_TRACKING_USERNAME"
MLFLOW_PASSWORD = "MLFLOW_TRACKING_PASSWORD"
# Config keys whose value is MLflow's tracking URI (its credentials go to MLflow's variables).
MLFLOW_KEYS = frozenset({"tracking.uri", "MLFLOW_TRACKING_URI"})

# scheme://USERINFO@ : the userinfo runs to the last '@' before the path, query or whitespace.
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<info>[^/?#\s'\"<>]*)@")
# Query parameters that carry a secret (basic tokens, pre-signed S3 URLs, SAS tokens).
_SECRET_PARAMS = (
    "password|passwd|pwd|secret|token|access_token|api_key|apikey|key|sig|signature"
    "|x-amz-signature|x-amz-credential|x-amz-security-token|aws_secret_access_key"
)
_QUERY = re.compile(rf"(?P<lead>[?&](?:{_SECRET_PARAMS})=)(?P<value>[^&#\s'\"<>]+)", re.I)


def has_credentials(text: str) -> bool:
    """Whether ``text`` holds a URI with a user-info part or a secret query parameter."""
    return bool(_USERINFO.search(text) or _QUERY.search(text))


def redact(text: str) -> str:
    """``text`` with every URI's user-info and secret query values replaced by ``***``."""
    if "://" not in text and "=" not in text:
        return text
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    return _QUERY.sub(lambda m: f"{m['lead']}{MASK}", text)


def strip_uri(uri: str) -> str:
    """``uri`` without its user-info and secret query parameters: the value to write down.
    The rest of the query keeps its order."""
    clean = _USERINFO.sub(lambda m: m["scheme"], uri)
    clean = _QUERY.sub("", clean)
    if "?" not in clean and "&" in clean:  # the first parameter went, another stays
        clean = clean.replace("&", "?", 1)
    return clean


def _kept() -> dict[str, str]:
    try:
        kept = json.loads(os.environ.get(ENV_KEEP, "{}"))
    except json.JSONDecodeError:
        return {}
    return kept if isinstance(kept, dict) else {}


def keep(uri: str, key: str, *, mlflow: bool | None = None) -> str:
    """Accept the credentials in ``uri`` (the value of config key or option ``key``) with a
    warning, keep them in this process's environment and return the URI without them.
    ``mlflow``: the URI is MLflow's tracking URI (default: ``key`` is one of ``MLFLOW_KEYS``)."""
    clean = strip_uri(uri)
    if clean == uri:
        return uri
    if key in MLFLOW_KEYS if mlflow is None else mlflow:
        m = _USERINFO.search(uri)
        if m and m["info"]:
            user, _, password = m["info"].partition(":")
            os.environ[MLFLOW_USERNAME] = unquote(user)
            os.environ[MLFLOW_PASSWORD] = unquote(password)
        where = f"${MLFLOW_USERNAME} and ${MLFLOW_PASSWORD}"
    else:
        where = f"${ENV_KEEP}"
    kept = _kept()
    if kept.get(clean) == uri:
        return clean  # accepted (and warned about) before
    kept[clean] = uri
    os.environ[ENV_KEEP] = json.dumps(kept)
    log.warning(
        "%s: credentials in the URI (%s) are kept in this process's environment (%s) and "
        "left out of everything written; give them in the environment or the tool's own "
        "credential file instead",
        key,
        redact(uri),
        where,
    )
    return clean


_ORIGIN = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/?#\s]*")


def with_credentials(uri: str) -> str:
    """The URI as the user gave it, credentials included, for ``uri`` returned by :func:`keep`
    (in this process or the one that submitted this job); a URI on the same scheme, host and
    port as one given with a user-info part (a shard of a ``{000..009}`` pattern) gets that
    user-info back; ``uri`` itself otherwise. Only for opening a connection: never write the
    result down."""
    kept = _kept()
    if uri in kept:
        return kept[uri]
    origin = _ORIGIN.match(uri)
    if origin is None or _USERINFO.match(uri):
        return uri
    for clean, original in kept.items():
        m = _USERINFO.match(original)
        if m and _ORIGIN.match(clean) and _ORIGIN.match(clean)[0] == origin[0]:
            return f"{m['scheme']}{m['info']}@{uri[len(m['scheme']) :]}"
    return uri


def _scrub(value: Any, key: str) -> Any:
    if isinstance(value, str):
        return keep(value, key) if has_credentials(value) else value
    if isinstance(value, list):
        return [_scrub(v, f"{key}.{i}") for i, v in enumerate(value)]
    if isinstance(value, tuple):
        return tuple(_scrub(v, f"{key}.{i}") for i, v in enumerate(value))
    if isinstance(value, dict):
        return {k: _scrub(v, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        scrub_config(value, key)
    return value


def scrub_config(cfg: Any, prefix: str = "") -> Any:
    """Replace, in place, every string of the dataclass tree ``cfg`` that holds credentials by
    the same URI without them (kept in the environment by :func:`keep`). Returns ``cfg``."""
    for f in dataclasses.fields(cfg):
        key = f"{prefix}.{f.name}" if prefix else f.name
        value = getattr(cfg, f.name)
        scrubbed = _scrub(value, key)
        if scrubbed is not value:
            object.__setattr__(cfg, f.name, scrubbed)
    return cfg


def redact_tree(tree: Any) -> Any:
    """A copy of a JSON-like tree (dicts, lists, strings) with :func:`redact` applied to every
    string: what a writer of config or results saves."""
    if isinstance(tree, str):
        return redact(tree)
    if isinstance(tree, dict):
        return {k: redact_tree(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [redact_tree(v) for v in tree]
    return tree


class RedactFilter(logging.Filter):
    """A logging filter that redacts credentials from a record's message and traceback; put it
    on every handler (a handler's filter sees the records of child loggers too)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if has_credentials(message):
            record.msg, record.args = redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text and has_credentials(record.exc_text):
            record.exc_text = redact(record.exc_text)
        return True


def install_log_filter(*handlers: logging.Handler) -> None:
    """Add one :class:`RedactFilter` to each handler (once)."""
    for h in handlers:
        if not any(isinstance(f, RedactFilter) for f in h.filters):
            h.addFilter(RedactFilter())
