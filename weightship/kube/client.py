"""Opening the Kubernetes API, and saying in one line why a call to it failed.

Two callers, two ways in: the agent runs in a pod and uses its service account (or,
outside a cluster, the kubeconfig KUBECONFIG names); ``weightship warm``/``status`` run on
a person's machine or in CI and use their kubeconfig (``~/.kube/config`` by default).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from weightship.errors import ConfigError, WeightshipError

if TYPE_CHECKING:
    from lightkube import Client

# The in-cluster service account, where the kubelet mounts it in every pod.
SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
DEFAULT_KUBECONFIG = Path("~/.kube/config")
# Seconds per API call: a reconcile or a discovery must not hang a warm or a status.
TIMEOUT = 10.0


class KubeError(WeightshipError):
    """The Kubernetes API answered with an error, or could not be reached."""


def in_cluster(service_account: Path = SERVICE_ACCOUNT) -> bool:
    """Whether this process runs in a pod with a service account token mounted."""
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and (service_account / "token").is_file()


def kubeconfig_path(explicit: str | None = None) -> Path | None:
    """The kubeconfig file to read: ``explicit``, else the first existing file KUBECONFIG
    lists (kubectl merges them all; weightship reads one), else ~/.kube/config if present."""
    if explicit:
        return Path(explicit).expanduser()
    listed = [p for p in os.environ.get("KUBECONFIG", "").split(os.pathsep) if p]
    for p in listed:
        if Path(p).expanduser().is_file():
            return Path(p).expanduser()
    if listed:
        return Path(listed[0]).expanduser()
    default = DEFAULT_KUBECONFIG.expanduser()
    return default if default.is_file() else None


def open_client(
    *, kubeconfig: str | None = None, context: str | None = None, prefer_in_cluster: bool = False
) -> Client:
    """A lightkube client. ``prefer_in_cluster`` (the agent): the pod's service account
    when there is one, else the kubeconfig. Otherwise (the CLI): the kubeconfig when there
    is one (``kubeconfig``, KUBECONFIG, ~/.kube/config), else the service account of the
    pod the command runs in. Raises ConfigError (exit 2) when neither exists or the
    kubeconfig is unusable."""
    import yaml  # lightkube reads kubeconfigs with PyYAML
    from lightkube import Client, KubeConfig
    from lightkube.core.exceptions import ConfigError as LightkubeConfigError

    path = None if (prefer_in_cluster and in_cluster() and not kubeconfig) else kubeconfig_path(kubeconfig)
    try:
        if path is None:
            if not in_cluster():
                raise ConfigError(
                    "no Kubernetes credentials: no kubeconfig (KUBECONFIG, ~/.kube/config) and no in-cluster"
                    " service account",
                    "set KUBECONFIG or `kubeconfig` in the region's kubernetes table",
                )
            config = KubeConfig.from_service_account(SERVICE_ACCOUNT).get()
        else:
            if not path.is_file():
                raise ConfigError(f"kubeconfig {path} not found", "set KUBECONFIG or `kubeconfig` to an existing file")
            config = KubeConfig.from_file(path).get(context)
            if config is None or config.user is None:
                # lightkube asserts on a context without a user; say it plainly instead.
                raise ConfigError(
                    f"kubeconfig {path}: context {config.context_name if config else context!r} names no user",
                    "add a user (token, client certificate or exec plugin) to it",
                )
        return Client(config, timeout=TIMEOUT, field_manager="weightship")
    except LightkubeConfigError as e:
        where = f"kubeconfig {path}" if path else f"service account {SERVICE_ACCOUNT}"
        raise ConfigError(f"{where}: {e}", "fix it or choose another context") from None
    except (KeyError, TypeError, ValueError, OSError, yaml.YAMLError) as e:
        # A kubeconfig that is not the YAML document kubectl writes (a missing cluster, say).
        where = f"kubeconfig {path}" if path else f"service account {SERVICE_ACCOUNT}"
        raise ConfigError(
            f"{where} is not usable ({type(e).__name__}: {e})", "check it with kubectl config view"
        ) from None


def describe(e: BaseException) -> str:
    """One line for a failed API call: the status and the API server's message, or why
    the server could not be reached."""
    from lightkube import ApiError

    httpx = _http_module()
    if isinstance(e, ApiError):
        code = e.status.code or e.response.status_code
        reason = {401: "unauthorised", 403: "forbidden", 404: "not found"}.get(code, e.status.reason or "error")
        return f"{code} {reason}: {' '.join(str(e.status.message or '').split())}".rstrip(": ")
    if isinstance(e, httpx.HTTPStatusError):
        return f"{e.response.status_code} {e.response.reason_phrase} from {e.request.url.host}"
    if isinstance(e, httpx.HTTPError):
        return f"cannot reach the API server ({type(e).__name__}: {e or 'no answer'})"
    return f"{type(e).__name__}: {e}"


def api_errors() -> tuple[type[BaseException], ...]:
    """What a lightkube call raises when the API fails (for ``except``)."""
    from lightkube.core.exceptions import ConfigError as LightkubeConfigError

    # ValueError: an answer that is not the JSON the API writes (a proxy's error page).
    return (_http_module().HTTPError, LightkubeConfigError, OSError, ValueError)


def _http_module():
    """The HTTP library lightkube speaks through (httpx, or its fork httpx2 in lightkube
    1.0), whose exceptions its calls raise."""
    from lightkube.core import exceptions

    return exceptions.httpx


__all__ = [
    "SERVICE_ACCOUNT",
    "TIMEOUT",
    "KubeError",
    "api_errors",
    "describe",
    "in_cluster",
    "kubeconfig_path",
    "open_client",
]
