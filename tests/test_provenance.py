"""Release provenance read from CI environment variables."""

from __future__ import annotations

from weightship.artifact.provenance import collect

GITHUB = {
    "CI": "true",
    "GITHUB_ACTIONS": "true",
    "GITHUB_SHA": "9f3c2a1b0e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b",
    "GITHUB_REPOSITORY": "acme/models",
    "GITHUB_SERVER_URL": "https://github.com",
    "GITHUB_RUN_ID": "8812345678",
    "GITHUB_RUN_ATTEMPT": "2",
    "GITHUB_REF": "refs/tags/v1.4.0",
    "GITHUB_WORKFLOW_REF": "acme/models/.github/workflows/release.yml@refs/tags/v1.4.0",
    "RUNNER_ENVIRONMENT": "github-hosted",
    "GITHUB_EVENT_NAME": "push",
    "GITHUB_TOKEN": "ghs_secret",
    "ACTIONS_ID_TOKEN_REQUEST_TOKEN": "secret",
}


def test_github_actions() -> None:
    source = collect(GITHUB)

    assert source == {
        "builder": "github-actions",
        "commit": "9f3c2a1b0e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b",
        "repository": "https://github.com/acme/models",
        "run_url": "https://github.com/acme/models/actions/runs/8812345678/attempts/2",
        "ref": "refs/tags/v1.4.0",
        "workflow": "acme/models/.github/workflows/release.yml@refs/tags/v1.4.0",
        "runner": "github-hosted",
        "event": "push",
    }
    assert not any("secret" in v for v in source.values())


def test_github_enterprise_server_url() -> None:
    env = {**GITHUB, "GITHUB_SERVER_URL": "https://ghe.acme.example/", "GITHUB_RUN_ATTEMPT": ""}

    source = collect(env)

    assert source["repository"] == "https://ghe.acme.example/acme/models"
    assert source["run_url"] == "https://ghe.acme.example/acme/models/actions/runs/8812345678"


def test_gitlab_ci() -> None:
    env = {
        "CI": "true",
        "GITLAB_CI": "true",
        "CI_COMMIT_SHA": "abc123",
        "CI_PROJECT_URL": "https://gitlab.example.com/acme/models",
        "CI_PIPELINE_URL": "https://gitlab.example.com/acme/models/-/pipelines/77",
        "CI_JOB_URL": "https://gitlab.example.com/acme/models/-/jobs/901",
        "CI_COMMIT_REF_NAME": "main",
        "CI_JOB_TOKEN": "secret",
    }

    assert collect(env) == {
        "builder": "gitlab-ci",
        "commit": "abc123",
        "repository": "https://gitlab.example.com/acme/models",
        "run_url": "https://gitlab.example.com/acme/models/-/pipelines/77",
        "job_url": "https://gitlab.example.com/acme/models/-/jobs/901",
        "ref": "main",
    }


def test_jenkins_and_generic_ci() -> None:
    jenkins = {"JENKINS_URL": "https://ci.acme/", "BUILD_URL": "https://ci.acme/job/m/5/", "GIT_COMMIT": "def"}
    generic = {"CI": "1", "BUILD_URL": "https://builds.acme/42"}

    assert collect(jenkins) == {"builder": "jenkins", "commit": "def", "run_url": "https://ci.acme/job/m/5/"}
    assert collect(generic) == {"builder": "ci", "run_url": "https://builds.acme/42"}


def test_empty_outside_ci() -> None:
    assert collect({}) == {}
    assert collect({"HOME": "/root", "GITHUB_SHA": "abc", "CI": "false"}) == {}
