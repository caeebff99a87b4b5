"""Where a release was built: read from the CI system's standard environment variables.

``publish`` records the result in the manifest's ``source`` field (OMS has no place for
it). Only variables that CI systems document as public build metadata are read: never
tokens. Outside CI the result is empty, so a laptop publish records nothing rather than
something misleading.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

# Longer values are not build metadata; refuse to copy them into every manifest.
_MAX_VALUE = 2048


def _get(env: Mapping[str, str], name: str) -> str:
    value = env.get(name, "").strip()
    return value if len(value) <= _MAX_VALUE else ""


def _github(env: Mapping[str, str]) -> dict[str, str]:
    server = _get(env, "GITHUB_SERVER_URL").rstrip("/") or "https://github.com"
    repo = _get(env, "GITHUB_REPOSITORY")
    run_id = _get(env, "GITHUB_RUN_ID")
    attempt = _get(env, "GITHUB_RUN_ATTEMPT")
    out = {
        "builder": "github-actions",
        "commit": _get(env, "GITHUB_SHA"),
        "ref": _get(env, "GITHUB_REF"),
        "workflow": _get(env, "GITHUB_WORKFLOW_REF"),
        "runner": _get(env, "RUNNER_ENVIRONMENT"),  # github-hosted or self-hosted
        "event": _get(env, "GITHUB_EVENT_NAME"),
    }
    if repo:
        out["repository"] = f"{server}/{repo}"
        if run_id:
            url = f"{server}/{repo}/actions/runs/{run_id}"
            # A re-run keeps the run id; the attempt says which logs built this release.
            out["run_url"] = f"{url}/attempts/{attempt}" if attempt else url
    return out


def _gitlab(env: Mapping[str, str]) -> dict[str, str]:
    return {
        "builder": "gitlab-ci",
        "commit": _get(env, "CI_COMMIT_SHA"),
        "ref": _get(env, "CI_COMMIT_REF_NAME"),
        "repository": _get(env, "CI_PROJECT_URL"),
        "run_url": _get(env, "CI_PIPELINE_URL"),
        "job_url": _get(env, "CI_JOB_URL"),
        "workflow": _get(env, "CI_CONFIG_PATH"),
        "event": _get(env, "CI_PIPELINE_SOURCE"),
    }


def _buildkite(env: Mapping[str, str]) -> dict[str, str]:
    return {
        "builder": "buildkite",
        "commit": _get(env, "BUILDKITE_COMMIT"),
        "ref": _get(env, "BUILDKITE_BRANCH"),
        "repository": _get(env, "BUILDKITE_REPO"),
        "run_url": _get(env, "BUILDKITE_BUILD_URL"),
        "workflow": _get(env, "BUILDKITE_PIPELINE_SLUG"),
    }


def _circleci(env: Mapping[str, str]) -> dict[str, str]:
    return {
        "builder": "circleci",
        "commit": _get(env, "CIRCLE_SHA1"),
        "ref": _get(env, "CIRCLE_BRANCH") or _get(env, "CIRCLE_TAG"),
        "repository": _get(env, "CIRCLE_REPOSITORY_URL"),
        "run_url": _get(env, "CIRCLE_BUILD_URL"),
        "workflow": _get(env, "CIRCLE_WORKFLOW_ID"),
    }


def _jenkins(env: Mapping[str, str]) -> dict[str, str]:
    return {
        "builder": "jenkins",
        "commit": _get(env, "GIT_COMMIT"),
        "ref": _get(env, "GIT_BRANCH"),
        "repository": _get(env, "GIT_URL"),
        "run_url": _get(env, "BUILD_URL"),
        "workflow": _get(env, "JOB_NAME"),
    }


def _generic(env: Mapping[str, str]) -> dict[str, str]:
    return {
        "builder": "ci",
        "commit": _get(env, "GIT_COMMIT") or _get(env, "COMMIT_SHA"),
        "repository": _get(env, "REPOSITORY_URL"),
        "run_url": _get(env, "BUILD_URL"),
    }


def _truthy(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes")


def collect(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Build provenance from the CI environment: keys such as ``commit``,
    ``repository``, ``run_url``, ``builder`` and ``workflow``. Empty outside CI."""
    env = os.environ if env is None else env
    if _truthy(_get(env, "GITHUB_ACTIONS")):
        found = _github(env)
    elif _truthy(_get(env, "GITLAB_CI")):
        found = _gitlab(env)
    elif _truthy(_get(env, "BUILDKITE")):
        found = _buildkite(env)
    elif _truthy(_get(env, "CIRCLECI")):
        found = _circleci(env)
    elif _get(env, "JENKINS_URL") and _get(env, "BUILD_URL"):
        found = _jenkins(env)
    elif _truthy(_get(env, "CI")):
        found = _generic(env)
    else:
        return {}
    return {k: v for k, v in found.items() if v}
