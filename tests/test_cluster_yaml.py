"""cluster.yaml passes the same preparation and schema checks `ray up` runs."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parent.parent / "cluster.yaml"


def load() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_cluster_yaml_is_valid_for_ray_up():
    prepared = prepare_config(copy.deepcopy(load()))
    validate_config(prepared)
    assert prepared["provider"]["type"] == "local"
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_setup_installs_this_package_on_every_node():
    cfg = load()
    assert any("pip install" in c and "voice-actors[local]" in c for c in cfg["setup_commands"])
    assert "~/voice-actors" in cfg["file_mounts"]


def test_head_starts_ray_with_the_servers_own_settings():
    """What `voice-actors serve` passes to a local Ray (actors/runtime.py),
    the cluster's head gets as RAY_* variables: the same GCS bounds."""
    from actors.runtime import RAY_SYSTEM_CONFIG

    [start] = [c for c in load()["head_start_ray_commands"] if "ray start" in c]
    for name, value in RAY_SYSTEM_CONFIG.items():
        assert f"RAY_{name}={value} " in start, (name, start)


def test_every_node_starts_ray_in_the_environment_the_server_gives_a_node_it_starts(monkeypatch, tmp_path):
    """actors/worker_env.py `prepare_this_node`: the same variables on both start lines."""
    import os
    import tempfile

    from actors.worker_env import prepare_this_node

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    from actors.worker_env import WORKER_SITE

    for name in ("MALLOC_ARENA_MAX", "PYTHONNODEBUGRANGES", "PYTHONPYCACHEPREFIX", "VOICE_ACTORS_DEFERRED_IMPORTS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))  # restored after
    prepare_this_node()
    cfg = load()
    [mount] = [remote for remote, local in cfg["file_mounts"].items() if local == "."]
    site = f"{mount.replace('~', '$HOME', 1)}/{WORKER_SITE.relative_to(CLUSTER_YAML.parent).as_posix()}"
    for start in (c for key in ("head_start_ray_commands", "worker_start_ray_commands") for c in cfg[key]
                  if "ray start" in c):
        for name in ("MALLOC_ARENA_MAX", "PYTHONNODEBUGRANGES", "VOICE_ACTORS_DEFERRED_IMPORTS"):
            assert f"{name}={os.environ[name]} " in start, (name, start)
        assert "PYTHONPYCACHEPREFIX=" in start, start
        assert f"PYTHONPATH={site} " in start, "the package's worker site, where file_mounts puts it"


def test_validation_really_rejects_a_broken_file():
    broken = copy.deepcopy(load())
    broken["setup_commandz"] = broken.pop("setup_commands")
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


def test_serve_config_is_a_valid_serve_deploy_file():
    from ray.serve.schema import ServeDeploySchema

    path = CLUSTER_YAML.parent / "config" / "serve.yaml"
    schema = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    app = schema.applications[0]
    assert app.import_path == "serve_app:app"
    deployment = app.deployments[0]
    assert deployment.name == "VoiceIngress" and deployment.max_ongoing_requests >= 500
    assert schema.http_options.request_timeout_s is None
