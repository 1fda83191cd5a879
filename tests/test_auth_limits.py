"""Authentication (passwords, JWTs, device tokens) and ingress limits, no Ray."""

from __future__ import annotations

import base64
import json
import pickle

import jwt
import pytest
from pydantic import SecretStr

from actors.ingress.admission import DeviceAdmission
from actors.ingress.auth import AuthError, Authenticator, Principal, check_device_ids, hash_password, verify_password
from actors.ingress.devices import DeviceRegistry
from actors.config import AuthConfig, UserConfig
from actors.ingress.limits import FailureLimiter, LimitError, RateLimiter, SessionSlots, check_size

JWT_SECRET = "test-jwt-secret-0123456789abcdef0123456789"
DEVICE_SECRET = "test-device-secret-0123456789abcdef012345"
FAST = 1000  # PBKDF2 rounds for tests: correctness, not strength
MAC = "AA:BB:CC:DD:EE:FF"


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_auth(clock: FakeClock | None = None, **overrides) -> Authenticator:
    fields = dict(
        jwt_secret=SecretStr(JWT_SECRET),
        device_secret=SecretStr(DEVICE_SECRET),
        users={"ada": UserConfig(password_hash=hash_password("lovelace", FAST),
                                 roles=["user", "admin"])},
    )
    fields.update(overrides)
    return Authenticator(AuthConfig(**fields), clock=clock or FakeClock())


def _b64url(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


# --------------------------------------------------------------------------- passwords


def test_password_hash_round_trip_and_format():
    encoded = hash_password("s3cret", FAST)
    scheme, rounds, salt, digest = encoded.split("$")
    assert (scheme, rounds) == ("pbkdf2_sha256", str(FAST))
    assert len(base64.b64decode(salt)) == 16 and len(base64.b64decode(digest)) == 32
    assert verify_password("s3cret", encoded)
    assert hash_password("s3cret", FAST) != encoded  # fresh salt each time


def test_wrong_password_does_not_verify():
    assert not verify_password("s3cret!", hash_password("s3cret", FAST))


@pytest.mark.parametrize("encoded", [
    "", "plain", "pbkdf2_sha256$abc$AAAA$AAAA", "md5$1000$AAAA$AAAA",
    "pbkdf2_sha256$1000$***$AAAA", "pbkdf2_sha256$1000$AAAA", "pbkdf2_sha256$0$AAAA$AAAA",
])
def test_malformed_hash_never_verifies(encoded):
    assert verify_password("anything", encoded) is False


# --------------------------------------------------------------------------- login and JWTs


def test_login_returns_a_token_for_the_user_and_roles():
    auth = make_auth()
    principal = auth.verify_token(auth.login("ada", "lovelace"))
    assert principal == Principal(subject="ada", kind="user", roles=("user", "admin"),
                                  expires_at=principal.expires_at)
    assert principal.expires_at == FakeClock().now + 3600


@pytest.mark.parametrize("user,password", [("nobody", "lovelace"), ("ada", "wrong")])
def test_login_refuses_unknown_user_and_wrong_password_alike(user, password):
    with pytest.raises(AuthError) as err:
        make_auth().login(user, password)
    assert err.value.code == "auth.bad_credentials"
    assert err.value.http_status == 401 and err.value.ws_close_code == 4401
    assert user not in err.value.message


def test_token_claims_are_complete():
    auth = make_auth()
    claims = jwt.decode(auth.issue_token("bob", ttl_s=60), JWT_SECRET, algorithms=["HS256"],
                        options={"verify_exp": False, "verify_iat": False})
    assert claims["iss"] == "voice-actors" and claims["sub"] == "bob" and claims["kind"] == "user"
    assert claims["exp"] - claims["iat"] == 60 and claims["roles"] == ["user"] and claims["jti"]


def test_token_signed_with_another_secret_is_refused():
    other = make_auth(jwt_secret=SecretStr("another-secret-0123456789abcdef0123456789"))
    with pytest.raises(AuthError) as err:
        make_auth().verify_token(other.issue_token("ada"))
    assert err.value.code == "auth.bad_token"


def test_tampered_payload_is_refused():
    auth = make_auth()
    header, payload, signature = auth.issue_token("bob").split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["roles"] = ["admin"]
    with pytest.raises(AuthError) as err:
        auth.verify_token(".".join([header, _b64url(claims), signature]))
    assert err.value.code == "auth.bad_token"


@pytest.mark.parametrize("token", ["", "garbage", "a.b.c", "dv1.1.2"])
def test_malformed_token_is_a_bad_token(token):
    with pytest.raises(AuthError) as err:
        make_auth().verify_token(token)
    assert err.value.code == "auth.bad_token"


def test_token_expires_by_the_injected_clock():
    clock = FakeClock()
    auth = make_auth(clock)
    token = auth.issue_token("bob", ttl_s=60)
    clock.now += 59
    assert auth.verify_token(token).subject == "bob"
    clock.now += 1
    with pytest.raises(AuthError) as err:
        auth.verify_token(token)
    assert err.value.code == "auth.expired"


def test_token_from_another_issuer_is_refused():
    foreign = make_auth(issuer="someone-else")
    with pytest.raises(AuthError) as err:
        make_auth().verify_token(foreign.issue_token("ada"))
    assert err.value.code == "auth.bad_token"


def test_unconfigured_jwt_secret_disables_user_tokens():
    auth = make_auth(jwt_secret=None)
    with pytest.raises(AuthError) as err:
        auth.issue_token("ada")
    assert err.value.code == "auth.disabled_secret" and err.value.http_status == 401


def test_errors_never_carry_the_secrets():
    auth = make_auth()
    for bad in (lambda: auth.verify_token("x.y.z"), lambda: auth.login("ada", "nope"),
                lambda: auth.verify_device_token("dv1.1." + "0" * 64, "c", MAC)):
        with pytest.raises(AuthError) as err:
            bad()
        assert JWT_SECRET not in str(err.value) and DEVICE_SECRET not in str(err.value)


def test_auth_error_survives_pickling():
    err = pickle.loads(pickle.dumps(AuthError("auth.forbidden_device")))
    assert (err.code, err.http_status, err.ws_close_code) == ("auth.forbidden_device", 403, 4403)


# --------------------------------------------------------------------------- device tokens


def test_device_token_round_trip():
    auth = make_auth()
    token = auth.issue_device_token("client-1", MAC, ttl_s=100)
    assert token.startswith("dv1.") and len(token.split(".")[2]) == 64
    principal = auth.verify_device_token(token, "client-1", MAC)
    assert (principal.kind, principal.subject, principal.client_id, principal.device_id) == (
        "device", MAC.lower(), "client-1", MAC.lower())  # MACs arrive in either case: one principal
    assert principal.key == f"device:{MAC.lower()}"
    assert principal.expires_at == FakeClock().now + 100


@pytest.mark.parametrize("client_id,device_id", [
    ("client-1", "11:22:33:44:55:66"), ("client-2", MAC)])
def test_device_token_is_bound_to_client_and_device(client_id, device_id):
    auth = make_auth()
    token = auth.issue_device_token("client-1", MAC)
    with pytest.raises(AuthError) as err:
        auth.verify_device_token(token, client_id, device_id)
    assert err.value.code == "auth.bad_device_token"


def test_device_token_expires():
    clock = FakeClock()
    auth = make_auth(clock)
    token = auth.issue_device_token("client-1", MAC, ttl_s=10)
    clock.now += 10
    with pytest.raises(AuthError) as err:
        auth.verify_device_token(token, "client-1", MAC)
    assert err.value.code == "auth.expired"


def test_forged_device_token_is_refused():
    auth = make_auth()
    _, expiry, mac = auth.issue_device_token("client-1", MAC).split(".")
    forged_mac = ("0" if mac[0] != "0" else "1") + mac[1:]
    later = str(int(expiry) + 10_000)
    for token in (f"dv1.{expiry}.{forged_mac}", f"dv1.{later}.{mac}", f"dv1.{expiry}.xyz"):
        with pytest.raises(AuthError) as err:
            auth.verify_device_token(token, "client-1", MAC)
        assert err.value.code == "auth.bad_device_token"


def test_device_token_from_another_secret_is_refused():
    other = make_auth(device_secret=SecretStr("another-device-secret-0123456789abcdef"))
    with pytest.raises(AuthError) as err:
        make_auth().verify_device_token(other.issue_device_token("c", MAC), "c", MAC)
    assert err.value.code == "auth.bad_device_token"


def test_unconfigured_device_secret_disables_device_tokens():
    issued = make_auth().issue_device_token("c", MAC)
    with pytest.raises(AuthError) as err:
        make_auth(device_secret=None).authenticate(issued, "c", MAC)
    assert err.value.code == "auth.disabled_secret"


# --------------------------------------------------------------------------- authenticate


def test_authenticate_routes_device_and_user_tokens():
    auth = make_auth()
    device = auth.authenticate(auth.issue_device_token("c", MAC), "c", MAC)
    user = auth.authenticate(auth.issue_token("ada"))
    assert device.kind == "device" and device.subject == MAC.lower()
    assert user.kind == "user" and user.subject == "ada" and user.device_id is None


def test_a_user_token_never_speaks_for_a_device():
    """Finding 3: a user JWT naming a Device-Id used to become that device's
    session owner and lock the real device out."""
    auth = make_auth()
    with pytest.raises(AuthError) as err:
        auth.authenticate(auth.issue_token("ada"), "c", MAC)
    assert err.value.code == "auth.device_token_required" and err.value.ws_close_code == 4403


def test_devices_and_users_are_different_principals_even_with_the_same_name():
    """Finding 3: Device-Id `local-dev` was the same principal as user `local-dev`."""
    auth = make_auth()
    device = auth.authenticate(auth.issue_device_token("c", "local-dev"), "c", "local-dev")
    user = auth.authenticate(auth.issue_token("local-dev"))
    assert device.subject == user.subject == "local-dev"
    assert device.key == "device:local-dev" and user.key == "user:local-dev" and device.key != user.key


@pytest.mark.parametrize("device_id", ["../../etc/passwd", "a\x00b", "x" * 4000, "", " ", "é", "a b", "\ud800"])
def test_device_ids_outside_the_format_are_refused(device_id):
    """Finding 1: OTA handed tokens to ids like ../../etc/passwd, NUL bytes, 4,000 characters."""
    with pytest.raises(AuthError) as err:
        check_device_ids(device_id, "client")
    assert err.value.code == "auth.bad_device_id" and err.value.http_status == 400
    with pytest.raises(AuthError) as err:
        check_device_ids("aa:bb:cc:dd:ee:ff", device_id)
    assert err.value.code == "auth.bad_client_id"


def test_device_and_client_ids_in_the_firmware_formats_pass():
    assert check_device_ids("AA:BB:CC:DD:EE:FF", "9f1c2a7e-0b7e-4c55-9d1a-0c8f3c6f2b11") == (
        "aa:bb:cc:dd:ee:ff", "9f1c2a7e-0b7e-4c55-9d1a-0c8f3c6f2b11")


def test_device_token_without_ids_is_refused():
    auth = make_auth()
    with pytest.raises(AuthError) as err:
        auth.authenticate(auth.issue_device_token("c", MAC))
    assert err.value.code == "auth.bad_device_token"


@pytest.mark.parametrize("token", [None, ""])
def test_missing_token_is_refused(token):
    with pytest.raises(AuthError) as err:
        make_auth().authenticate(token, "c", MAC)
    assert err.value.code == "auth.missing_token" and err.value.ws_close_code == 4401


def admission(tmp_path, **overrides) -> DeviceAdmission:
    return DeviceAdmission(AuthConfig(**overrides), DeviceRegistry(tmp_path / "devices.sqlite3"))


def test_allowlisted_device_is_admitted_in_any_case(tmp_path):
    adm = admission(tmp_path, device_allowlist=["AA:BB:CC:DD:EE:FF"], device_admission="activation")
    assert adm.on_ota(MAC.lower(), "c", "192.168.1.20").admitted
    adm.check_socket(MAC.lower())


def test_an_admitted_devices_boot_does_not_wait_for_the_write_lock(tmp_path):
    """Each boot's OTA of an allow-listed or loopback device used to write its
    row again: in a burst those writes queued for the file's one write lock."""
    import sqlite3
    import threading

    adm = admission(tmp_path, device_allowlist=["AA:BB:CC:DD:EE:FF"], device_admission="activation")
    assert adm.on_ota(MAC.lower(), "c", "192.168.1.20").admitted  # first boot: written
    writer = sqlite3.connect(tmp_path / "devices.sqlite3")
    writer.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    try:
        answers: list[bool] = []
        boot = threading.Thread(target=lambda: answers.append(adm.on_ota(MAC.lower(), "c", "192.168.1.20").admitted))
        boot.start()
        boot.join(3.0)
        assert answers == [True], "an admitted device's OTA waited for the write lock"
    finally:
        writer.rollback()
        writer.close()
    boot.join()
    assert adm.registry.list()[0]["admitted_by"] == "allowlist"


def test_allowlist_mode_refuses_unlisted_devices(tmp_path):
    adm = admission(tmp_path, device_allowlist=["11:22:33:44:55:66"], device_admission="allowlist")
    with pytest.raises(AuthError) as err:
        adm.on_ota(MAC.lower(), "c", "127.0.0.1")
    assert err.value.code == "auth.forbidden_device" and err.value.ws_close_code == 4403
    with pytest.raises(AuthError):
        adm.check_socket(MAC.lower())


def test_activation_hands_out_a_code_and_admits_only_after_confirmation(tmp_path):
    """Finding 1: anyone could become any device; now an unknown device gets a
    code, no token, until a user confirms the code."""
    adm = admission(tmp_path, device_admission="activation")
    first = adm.on_ota("aa:bb:cc:dd:ee:01", "c", "192.168.1.20")
    assert not first.admitted and first.activation is not None and len(first.activation.code) == 6
    again = adm.on_ota("aa:bb:cc:dd:ee:01", "c", "192.168.1.20")
    assert again.activation is not None and again.activation.code == first.activation.code
    with pytest.raises(AuthError):
        adm.check_socket("aa:bb:cc:dd:ee:01")
    wrong = "000000" if first.activation.code != "000000" else "000001"
    assert adm.registry.confirm(wrong, "user:ada") is None
    assert adm.registry.confirm(first.activation.code, "user:ada") == "aa:bb:cc:dd:ee:01"
    assert adm.registry.confirm(first.activation.code, "user:eve") is None  # used up
    assert adm.on_ota("aa:bb:cc:dd:ee:01", "c", "192.168.1.20").admitted
    assert adm.check_socket("aa:bb:cc:dd:ee:01") is None  # admitted; no persona chosen: the default
    assert adm.registry.set_persona("aa:bb:cc:dd:ee:01", "ava")
    assert adm.check_socket("aa:bb:cc:dd:ee:01") == "ava"  # read with the admission, one query
    assert [d["owner"] for d in adm.registry.list("user:ada")] == ["user:ada"]
    assert adm.registry.list("user:eve") == []
    assert adm.registry.revoke("aa:bb:cc:dd:ee:01")
    with pytest.raises(AuthError):  # revoked: its unexpired token no longer opens a socket
        adm.check_socket("aa:bb:cc:dd:ee:01")


def test_auto_admission_is_open_on_loopback_only(tmp_path):
    adm = admission(tmp_path)
    assert adm.mode_for("127.0.0.1") == "open" and adm.mode_for("::1") == "open"
    assert adm.mode_for("192.168.1.20") == "activation" and adm.mode_for("10.0.0.5") == "activation"
    assert adm.mode_for(None) == "activation" and adm.mode_for("not-an-ip") == "activation"
    assert adm.on_ota("aa:bb:cc:dd:ee:02", "c", "127.0.0.1").admitted
    assert not adm.on_ota("aa:bb:cc:dd:ee:03", "c", "192.168.1.20").admitted


def test_pending_activations_are_capped(tmp_path):
    """Finding 1/6: 36 made-up ids gave 36 tokens; now they give codes, at most max_pending_activations."""
    adm = admission(tmp_path, device_admission="activation", max_pending_activations=3)
    for i in range(3):
        assert adm.on_ota(f"aa:bb:cc:dd:ee:{i:02x}", "c", "192.168.1.20").activation is not None
    with pytest.raises(LimitError) as err:
        adm.on_ota("aa:bb:cc:dd:ee:ff", "c", "192.168.1.20")
    assert err.value.code == "limit.pending_activations" and err.value.http_status == 429


def test_disabled_auth_makes_everyone_anonymous():
    auth = make_auth(enabled=False, jwt_secret=None, device_secret=None)
    assert auth.authenticate(None, "c", MAC) == Principal(
        subject=MAC.lower(), kind="anonymous", roles=(), client_id="c", device_id=MAC.lower())
    assert auth.authenticate("junk").subject == "anonymous"


# --------------------------------------------------------------------------- token_from


def test_token_from_prefers_bearer_header_over_query():
    assert Authenticator.token_from({"Authorization": "Bearer abc"}, {"token": "q"}) == "abc"


def test_token_from_header_is_case_insensitive():
    assert Authenticator.token_from({"authorization": "bearer  abc "}, {}) == "abc"
    assert Authenticator.token_from({"AUTHORIZATION": "BEARER xyz"}, {}) == "xyz"


def test_token_from_reads_the_browser_clients_authorization_query():
    """Issue 8: browser xiaozhi clients send ?authorization=Bearer%20<token> (decoded by then)."""
    assert Authenticator.token_from({}, {"authorization": "Bearer dv1.9.abc"}) == "dv1.9.abc"
    assert Authenticator.token_from({}, {"authorization": "dv1.9.abc"}) == "dv1.9.abc"
    assert Authenticator.token_from({"Authorization": "Bearer h"}, {"authorization": "Bearer q"}) == "h"


def test_token_from_falls_back_to_query():
    assert Authenticator.token_from({}, {"token": "t1"}) == "t1"
    assert Authenticator.token_from({}, {"access_token": "t2"}) == "t2"
    assert Authenticator.token_from({"Authorization": "Basic Zm9vOmJhcg=="},
                                    {"access_token": "t3"}) == "t3"
    assert Authenticator.token_from({"Authorization": "Bearer "}, {}) is None
    assert Authenticator.token_from({}, {}) is None


# --------------------------------------------------------------------------- rate limiter


def test_rate_limiter_trips_after_burst_and_refills():
    clock = FakeClock(0.0)
    limiter = RateLimiter(rate_per_minute=60, burst=3, clock=clock)  # 1 token/s
    for _ in range(3):
        limiter.check("ip-1")
    with pytest.raises(LimitError) as err:
        limiter.check("ip-1")
    assert err.value.code == "limit.rate" and err.value.http_status == 429
    assert err.value.ws_close_code == 4429
    limiter.check("ip-2")  # other keys have their own bucket
    clock.now += 1.0
    limiter.check("ip-1")
    with pytest.raises(LimitError):
        limiter.check("ip-1")


def test_rate_limiter_retry_after_is_time_to_next_token():
    clock = FakeClock(0.0)
    limiter = RateLimiter(rate_per_minute=30, burst=1, clock=clock)  # one token per 2 s
    limiter.check("k")
    clock.now += 0.5
    with pytest.raises(LimitError) as err:
        limiter.check("k")
    assert err.value.retry_after_s == pytest.approx(1.5)
    clock.now += err.value.retry_after_s
    limiter.check("k")


def test_rate_limiter_refill_is_capped_at_burst():
    clock = FakeClock(0.0)
    limiter = RateLimiter(rate_per_minute=60, burst=2, clock=clock)
    clock.now += 1000
    limiter.check("k")
    limiter.check("k")
    with pytest.raises(LimitError):
        limiter.check("k")


def test_rate_limiter_evicts_least_recently_used_keys():
    clock = FakeClock(0.0)
    limiter = RateLimiter(rate_per_minute=1, burst=1, clock=clock, max_keys=3)
    for key in ("a", "b", "c"):
        limiter.check(key)
    with pytest.raises(LimitError):
        limiter.check("a")  # touches "a": now "b" is the oldest
    limiter.check("d")
    assert len(limiter) == 3
    limiter.check("b")  # was evicted, so it starts over with a full bucket
    with pytest.raises(LimitError):
        limiter.check("a")  # "a" was kept, still empty
    for i in range(1000):
        limiter.check(f"flood-{i}")
    assert len(limiter) == 3


# --------------------------------------------------------------------------- session slots


def test_session_slots_limit_total():
    slots = SessionSlots(max_total=2, max_per_client=5)
    slots.acquire("a")
    slots.acquire("b")
    with pytest.raises(LimitError) as err:
        slots.acquire("c")
    assert err.value.code == "limit.sessions" and err.value.http_status == 429
    assert slots.in_use == 2


def test_session_slots_limit_per_client():
    slots = SessionSlots(max_total=10, max_per_client=2)
    slots.acquire("a")
    slots.acquire("a")
    with pytest.raises(LimitError) as err:
        slots.acquire("a")
    assert err.value.code == "limit.client_sessions" and err.value.ws_close_code == 4429
    slots.acquire("b")
    assert (slots.in_use_by("a"), slots.in_use_by("b"), slots.in_use) == (2, 1, 3)


def test_session_slot_release_is_idempotent():
    slots = SessionSlots(max_total=1, max_per_client=1)
    slot = slots.acquire("a")
    slot.release()
    slot.release()
    assert slots.in_use == 0 and slots.in_use_by("a") == 0 and slot.released
    other = slots.acquire("a")
    slot.release()  # a stale handle must not free the new holder's place
    assert slots.in_use == 1
    with pytest.raises(LimitError):
        slots.acquire("b")
    other.release()


def test_session_slot_context_manager_releases_even_on_error():
    slots = SessionSlots(max_total=1, max_per_client=1)
    with pytest.raises(RuntimeError):
        with slots.acquire("a") as slot:
            assert slots.in_use == 1 and slot.client == "a"
            raise RuntimeError("socket dropped")
    assert slots.in_use == 0
    with slots.acquire("a"):
        assert slots.in_use_by("a") == 1
    assert slots.in_use_by("a") == 0


# --------------------------------------------------------------------------- sizes


def test_check_size_refuses_only_above_the_limit():
    check_size(1024, 1024, "frame")
    with pytest.raises(LimitError) as err:
        check_size(1025, 1024, "frame")
    assert err.value.code == "limit.too_large" and err.value.http_status == 413
    assert err.value.ws_close_code == 1009 and "frame" in err.value.message
    assert err.value.retry_after_s is None


def test_limit_error_survives_pickling():
    err = pickle.loads(pickle.dumps(LimitError("limit.rate", retry_after_s=2.5)))
    assert (err.code, err.retry_after_s, err.http_status) == ("limit.rate", 2.5, 429)


# --------------------------------------------------------------------------- failed attempts


def test_failures_lock_a_key_with_doubling_back_off():
    """Finding 10: 40 wrong passwords in 9 s all got 401, never 429."""
    clock = FakeClock()
    limiter = FailureLimiter(max_failures=3, window_s=60, base_lock_s=2, max_lock_s=10, clock=clock)
    for _ in range(2):
        limiter.check("user:ada")
        limiter.failed("user:ada", "ip:10.0.0.9")
    limiter.check("user:ada")  # two failures: not yet locked
    limiter.failed("user:ada", "ip:10.0.0.9")
    with pytest.raises(LimitError) as err:
        limiter.check("user:ada")
    assert err.value.code == "limit.auth_failures" and err.value.retry_after_s == pytest.approx(2)
    with pytest.raises(LimitError):
        limiter.check("user:bob", "ip:10.0.0.9")  # the address is locked for every name
    limiter.check("user:bob", "ip:10.0.0.10")
    clock.now += 2.1
    limiter.check("user:ada")
    limiter.failed("user:ada")  # fourth failure: 4 s
    with pytest.raises(LimitError) as err:
        limiter.check("user:ada")
    assert err.value.retry_after_s == pytest.approx(4)
    for _ in range(5):
        limiter.failed("user:ada")
    with pytest.raises(LimitError) as err:
        limiter.check("user:ada")
    assert err.value.retry_after_s == pytest.approx(10)  # 2 s × 2^6, capped at max_lock_s


def test_success_clears_failures_and_old_failures_are_forgiven():
    clock = FakeClock()
    limiter = FailureLimiter(max_failures=2, window_s=60, base_lock_s=1, max_lock_s=10, clock=clock)
    limiter.failed("k")
    limiter.succeeded("k")
    limiter.failed("k")
    limiter.check("k")
    clock.now += 61
    limiter.failed("k")  # the first failure's window passed: this is the first again
    limiter.check("k")
