"""`voice-actors serve` on a real network and for days (issue 8 items 7 and 8):
where it listens and says so, secrets that survive a restart, a development
token that is renewed while the server runs. No Ray needed."""

from __future__ import annotations

import stat
import time

import pytest
from pydantic import SecretStr

from actors.cli import main, reachability_message, refresh_dev_token
from actors.config import load_config
from actors.ingress.auth import Authenticator
from serve_app import with_secrets


def config_with(tmp_path, **auth):
    config = load_config(env={})
    return config.model_copy(update={"auth": config.auth.model_copy(update={
        "secrets_file": str(tmp_path / "secrets.json"), **auth})})


def test_generated_secrets_are_kept_with_mode_600_and_reused(tmp_path):
    first = with_secrets(config_with(tmp_path))
    path = tmp_path / "secrets.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    second = with_secrets(config_with(tmp_path))  # a restart
    for name in ("jwt_secret", "device_secret"):
        value = getattr(first.auth, name).get_secret_value()
        assert len(value) >= 32 and value == getattr(second.auth, name).get_secret_value()
    # a device token from before the restart still verifies after it
    token = Authenticator(first.auth).issue_device_token("c", "aa:bb:cc:dd:ee:ff")
    assert Authenticator(second.auth).verify_device_token(token, "c", "aa:bb:cc:dd:ee:ff").kind == "device"
    path.chmod(0o644)
    with_secrets(config_with(tmp_path))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_given_secrets_win_and_nothing_is_written(tmp_path):
    given = with_secrets(config_with(tmp_path, jwt_secret=SecretStr("j" * 40), device_secret=SecretStr("d" * 40)))
    assert given.auth.jwt_secret.get_secret_value() == "j" * 40
    assert not (tmp_path / "secrets.json").exists()


def test_without_a_secrets_file_each_start_gets_new_secrets(tmp_path):
    a = with_secrets(config_with(tmp_path, secrets_file=None)).auth.jwt_secret.get_secret_value()
    b = with_secrets(config_with(tmp_path, secrets_file=None)).auth.jwt_secret.get_secret_value()
    assert a != b and not (tmp_path / "secrets.json").exists()


def test_the_development_token_is_renewed_before_it_expires(tmp_path):
    config = with_secrets(config_with(tmp_path, token_ttl_s=4))
    path = tmp_path / "token"
    assert refresh_dev_token(config, path) is True
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    token = path.read_text()
    assert refresh_dev_token(config, path) is False and path.read_text() == token  # still fresh
    time.sleep(2.2)  # past half its life
    assert refresh_dev_token(config, path) is True and path.read_text() != token
    principal = Authenticator(config.auth).verify_token(path.read_text())
    assert principal.subject == "local-dev" and principal.expires_at > time.time() + 2  # exp is whole seconds
    path.write_text("garbage")
    assert refresh_dev_token(config, path) is True


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1"])
def test_a_loopback_server_says_how_devices_reach_it(host):
    message = reachability_message(host, 8000)
    assert "--host 0.0.0.0" in message and "/xiaozhi/ota/" in message


def test_a_server_on_all_interfaces_names_the_ota_url():
    message = reachability_message("0.0.0.0", 8123)
    assert ":8123/xiaozhi/ota/" in message and "activate" in message


def test_the_ota_url_shown_is_one_a_device_can_use(monkeypatch):
    """A host name that resolves only to loopback (Debian's 127.0.1.1) once
    made the server tell people to point devices at http://0.0.0.0:..."""
    from actors import cli

    assert all(not a.startswith("127.") and a != "0.0.0.0" for a in cli._local_addresses())
    monkeypatch.setattr(cli, "_local_addresses", lambda: [])
    message = reachability_message("0.0.0.0", 8128)
    assert "0.0.0.0" not in message and "http://<this machine's address>:8128/xiaozhi/ota/" in message


def test_serve_help_lists_host(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    assert "--host" in out and "--port" in out and "0.0.0.0" in out


def test_serve_refuses_a_cloud_provider_without_its_key_before_starting_anything(tmp_path, monkeypatch, capsys):
    """Issue 9 item 8: a configured provider without its key fails at start, naming the variable."""
    from actors.config import PROJECT_ROOT

    monkeypatch.delenv("DASHSCOPE_API_KEY", raising=False)
    monkeypatch.setenv("VOICE_ACTORS__AUTH__SECRETS_FILE", str(tmp_path / "secrets.json"))
    code = main(["--config", str(PROJECT_ROOT / "config" / "cloud-zh.yaml"), "serve"])
    err = capsys.readouterr().err
    assert code == 2 and "$DASHSCOPE_API_KEY" in err and "stt provider 'dashscope'" in err
    assert "llm provider 'openai-compatible'" in err and "ray:" not in err  # refused before Ray started


def test_a_key_in_the_environment_or_the_config_satisfies_the_check():
    from actors.config import PROJECT_ROOT
    from actors.providers.registry import missing_keys, skipped_for_keys

    config = load_config(PROJECT_ROOT / "config" / "cloud-zh.yaml", env={})
    problems = missing_keys(config, env={})
    # stt and llm have no fallback; tts falls back to local-espeak, so it is only skipped
    assert [p.split()[0] for p in problems] == ["stt", "llm"]
    assert all("$DASHSCOPE_API_KEY" in p for p in problems)
    skipped = skipped_for_keys(config, env={})
    assert len(skipped) == 1 and skipped[0].startswith("tts provider 'dashscope'") and "fallback" in skipped[0]
    assert missing_keys(config, env={"DASHSCOPE_API_KEY": "sk-x"}) == []
    assert missing_keys(load_config(env={}), env={}) == []  # the embedded default needs no key


def test_serve_deploy_refuses_it_too(monkeypatch):
    """`serve deploy` imports serve_app:app, built by build_app: the same check, the same words."""
    from actors.config import PROJECT_ROOT, ConfigError
    from serve_app import build_app

    monkeypatch.delenv("DASHSCOPE_API_KEY", raising=False)
    with pytest.raises(ConfigError, match=r"\$DASHSCOPE_API_KEY"):
        build_app(load_config(PROJECT_ROOT / "config" / "cloud-zh.yaml", env={}))


def test_serve_writes_the_development_token_before_the_server_answers(tmp_path, monkeypatch, capsys):
    """A script that waits for /health and then reads ~/.voice-actors-token
    must find this server's token there, not an earlier one's."""
    from ray import serve

    import actors.cli as cli
    import actors.pools
    import actors.runtime

    token_file = tmp_path / "token"
    token_file.write_text("an earlier server's token")
    monkeypatch.setattr(cli, "DEV_TOKEN_FILE", token_file)
    monkeypatch.setenv("VOICE_ACTORS__AUTH__SECRETS_FILE", str(tmp_path / "secrets.json"))
    seen_when_answering: list[str] = []
    monkeypatch.setattr(actors.runtime, "connect_ray", lambda config, address: "(not started)")
    monkeypatch.setattr(actors.pools, "ensure_pools", lambda config: None)
    monkeypatch.setattr(serve, "start", lambda **kwargs: None)
    monkeypatch.setattr(serve, "run", lambda *a, **kw: seen_when_answering.append(token_file.read_text()))
    monkeypatch.setattr(serve, "shutdown", lambda: None)

    def stop(_: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.time, "sleep", stop)
    assert main(["serve"]) == 0
    [token] = seen_when_answering
    config = with_secrets(load_config(env={"VOICE_ACTORS__AUTH__SECRETS_FILE": str(tmp_path / "secrets.json")}))
    assert Authenticator(config.auth).verify_token(token).subject == "local-dev"
