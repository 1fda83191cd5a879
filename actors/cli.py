"""`voice-actors`: run the server, run one spoken turn, or make a speech WAV.

    voice-actors serve                         # Ray Serve ingress on the embedded default
    voice-actors turn question.wav -o reply.wav
    voice-actors turn --text "What time is it?" -o reply.wav
    voice-actors say "Tell me about the Rosetta Stone." -o question.wav
    voice-actors client question.wav [--xiaozhi]   # over the network to a running server
    voice-actors hash-password                    # for auth.users in the config
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

from actors.config import AppConfig, ConfigError, load_config

DEV_TOKEN_FILE = Path.home() / ".voice-actors-token"
"""Where `serve` leaves a development token: a file, not the log."""


def _turn(args: argparse.Namespace) -> int:
    from actors.audio import AudioFormatError, read_wav
    from actors.pools import ensure_pools
    from actors.runtime import connect_ray
    from actors.sessions import SessionHandle

    config = load_config(args.config)
    if not args.text and not args.wav:
        print("error: give a WAV file or --text", file=sys.stderr)
        return 2
    try:
        pcm = read_wav(args.wav) if args.wav else b""
    except (AudioFormatError, FileNotFoundError) as e:
        print(f"error: {args.wav}: {e}", file=sys.stderr)
        return 2
    print(f"ray: {connect_ray(config, args.address)}", file=sys.stderr)
    started = time.perf_counter()
    print("loading models (first run only)...", file=sys.stderr)
    ensure_pools(config)
    session = SessionHandle.open(args.session, config)
    print(f"session {session.session_id} ready in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    result = session.ask_text(args.text) if args.text else session.ask_audio(pcm)
    if not args.text and result.transcript is None and not result.errors:
        print("no speech was found in the audio", file=sys.stderr)
    if result.transcript is not None:
        print(f"transcript: {result.transcript}")
    print(f"reply:      {result.reply}")
    for err in result.errors:
        print(f"error:      [{err.code}] {err.message}")
    timings = ", ".join(f"{k}={v} ms" for k, v in result.metrics.items()
                        if k.endswith("_ms") and v is not None)
    print(f"timings:    {timings}")
    if args.out and result.audio:
        result.save_audio(args.out)
        seconds = len(result.audio) / 2 / result.sample_rate
        print(f"audio:      {args.out} ({seconds:.1f} s at {result.sample_rate} Hz)")
    if not args.keep:
        session.close()
    return 0 if result.reply else 1


def _client(args: argparse.Namespace) -> int:
    import asyncio

    import httpx

    from actors.audio import AudioFormatError, read_wav, write_wav
    from actors.client import NativeClient, XiaozhiClient, connect_patiently, server_busy

    try:
        pcm = read_wav(args.wav) if args.wav else b""
    except (AudioFormatError, FileNotFoundError) as e:
        print(f"error: {args.wav}: {e}", file=sys.stderr)
        return 2
    if not pcm and not args.text:
        print("error: give a WAV file or --text", file=sys.stderr)
        return 2
    base = args.url.rstrip("/")
    ws_base = "ws" + base[4:] if base.startswith("http") else base
    token = args.token or (DEV_TOKEN_FILE.read_text().strip() if DEV_TOKEN_FILE.exists() else None)

    def show(msg: dict) -> None:
        kind = msg.get("type")
        if kind in ("stt.partial", "stt.final", "stt"):
            print(f"  [{'final' if kind != 'stt.partial' else 'partial'}] {msg['text']}")
        elif kind == "tts.sentence" or (kind == "tts" and msg.get("state") == "sentence_start"):
            print(f"  [reply] {msg['text']}")
        elif kind == "error":
            print(f"  [error {msg.get('code')}] {msg.get('message')}")

    async def _device_websocket(base: str, device_id: str) -> dict:
        """OTA as the firmware does it: if the server asks for activation,
        show the code and wait (polling /activate) until its owner confirms it."""
        headers = {"Device-Id": device_id, "Client-Id": device_id}
        async with httpx.AsyncClient(timeout=30) as http:
            while True:
                ota = await http.post(f"{base}/xiaozhi/ota/", headers=headers, json={})
                ota.raise_for_status()
                answer = ota.json()
                if "websocket" in answer:
                    return answer["websocket"]
                code = answer["activation"]["code"]
                print(f"this device waits for activation: code {code}. As its owner, confirm it with\n"
                      f"  curl -H 'Authorization: Bearer <your token>' -H 'content-type: application/json' "
                      f"-d '{{\"code\": \"{code}\"}}' {base}/api/devices/activate", file=sys.stderr)
                while (await http.post(f"{base}/xiaozhi/ota/activate", headers=headers, json={})).status_code != 200:
                    await asyncio.sleep(3)

    async def run() -> object:
        if args.xiaozhi:
            ws_info = await _device_websocket(base, args.device_id)
            async with await connect_patiently(lambda: XiaozhiClient.connect(
                    ws_info["url"], ws_info["token"] or token, args.device_id, client_id=args.device_id,
                    version=args.protocol_version), retry=server_busy) as c:
                return await c.ask_audio(pcm, on_event=show)
        async with await connect_patiently(lambda: NativeClient.connect(f"{ws_base}/ws/voice", token,
                                                                        args.session), retry=server_busy) as c:
            print(f"session {c.session_id}")
            if args.text:
                return await c.ask_text(args.text, on_event=show)
            return await c.ask_audio(pcm, on_event=show)

    try:
        turn = asyncio.run(run())
    except (OSError, httpx.HTTPError) as e:
        print(f"error: cannot reach {base}: {e}", file=sys.stderr)
        return 3
    except Exception as e:  # a refused handshake or a closed socket: say why, briefly
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 3
    if turn.end_of_speech_to_first_audio_ms is not None:
        print(f"end of speech -> first audio: {turn.end_of_speech_to_first_audio_ms:.0f} ms")
    if args.out and turn.audio:
        write_wav(args.out, turn.audio, turn.sample_rate)
        print(f"audio: {args.out} ({len(turn.audio) / 2 / turn.sample_rate:.1f} s at {turn.sample_rate} Hz)")
    return 0 if turn.audio or turn.reply else 1


def _hash_password(args: argparse.Namespace) -> int:
    import getpass

    from actors.ingress.auth import hash_password

    password = args.password or getpass.getpass("password: ")
    print(hash_password(password))
    return 0


def _say(args: argparse.Namespace) -> int:
    import asyncio

    from actors.audio import resample_pcm16, write_wav
    from actors.providers import build_tts

    config = load_config(args.config)
    seg = asyncio.run(build_tts(config.tts.provider, config).synthesize(args.text))
    write_wav(args.out, resample_pcm16(seg.pcm16, seg.sample_rate, 16000), 16000)
    print(f"wrote {args.out}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from ray import serve

    from actors.pools import ensure_pools
    from actors.providers.registry import missing_keys, skipped_for_keys
    from actors.runtime import connect_ray
    from serve_app import build_app, with_secrets

    config = with_secrets(load_config(args.config))
    if problems := missing_keys(config):
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    for skipped in skipped_for_keys(config):
        print(f"warning: {skipped}", file=sys.stderr)
    server = config.server.model_copy(update={k: v for k, v in (("host", args.host), ("port", args.port)) if v})
    config = config.model_copy(update={"server": server})
    if args.gateway_port is not None:
        config = config.model_copy(update={"ingress": config.ingress.model_copy(
            update={"gateway_port": args.gateway_port})})
    print(f"ray: {connect_ray(config, args.address)}", file=sys.stderr)
    if config.auth.enabled:  # before the server answers: a script that waits for /health then reads it
        refresh_dev_token(config, DEV_TOKEN_FILE)
    print("loading models...", file=sys.stderr)
    ensure_pools(config)
    serve.start(http_options={"host": server.host, "port": server.port})
    serve.run(build_app(config), name="voice-actors", route_prefix="/")
    print(f"voice-actors listening on http://{server.host}:{server.port} (Ctrl-C to stop)", file=sys.stderr)
    print(reachability_message(server.host, config.ingress.gateway_port or server.port), file=sys.stderr)
    if config.ingress.gateway_port:
        print(f"device sockets and OTA: the device gateway on port {config.ingress.gateway_port} (an OTA through "
              f"port {server.port} hands devices its URL too; actors/ingress/gateway.py)", file=sys.stderr)
    if config.auth.enabled:
        print(f"a development token is in {DEV_TOKEN_FILE} (mode 600, renewed while the server runs); "
              "`voice-actors client` reads it", file=sys.stderr)
    try:
        while True:
            time.sleep(DEV_TOKEN_CHECK_S)
            if config.auth.enabled:
                refresh_dev_token(config, DEV_TOKEN_FILE)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0


DEV_TOKEN_CHECK_S = 60.0


def refresh_dev_token(config: AppConfig, path: Path) -> bool:
    """Write a new development token when the one in `path` is missing,
    unreadable, or past half its life; → True when it wrote one. A server
    left running for days keeps a token the CLI can use (it used to expire
    after an hour while the server ran on)."""
    from actors.ingress.auth import Authenticator, AuthError

    auth = Authenticator(config.auth)
    try:
        left = auth.verify_token(path.read_text().strip()).expires_at or 0.0
        if left - time.time() > config.auth.token_ttl_s / 2:
            return False
    except (OSError, AuthError):
        pass
    token = auth.issue_token("local-dev", roles=("admin",))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, token.encode())
    finally:
        os.close(fd)
    path.chmod(0o600)
    return True


def reachability_message(host: str, port: int) -> str:
    """Say at start how devices reach this server, so nobody wonders why a
    device on the LAN cannot connect to a loopback-only server. `port` is
    where devices ask OTA: the device gateway's when it is on (no Serve hop)."""
    from actors.ingress.admission import is_loopback

    if is_loopback(host) or host == "localhost":
        return (f"only this machine can reach it. For devices on your network: voice-actors serve --host 0.0.0.0 "
                f"and point their OTA URL at http://<this machine's address>:{port}/xiaozhi/ota/ "
                "(they are admitted by activation code, docs/security.md)")
    anywhere = "<this machine's address>" if host in ("0.0.0.0", "::") else host
    shown = ", ".join(f"http://{a}:{port}/xiaozhi/ota/" for a in _local_addresses()) or \
        f"http://{anywhere}:{port}/xiaozhi/ota/"
    return (f"devices on your network: set their OTA URL to {shown}; each shows a six-digit code until you "
            "confirm it with POST /api/devices/activate (docs/security.md)")


def _local_addresses() -> list[str]:
    """This machine's IPv4 addresses others may reach. The host name alone
    often resolves only to loopback (Debian maps it to 127.0.1.1), so the
    address of the default route's interface counts too: a UDP socket
    "connected" to an outside address picks it without sending a packet."""
    import socket

    found: set[str] = set()
    with contextlib.suppress(OSError):
        found.update(info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET))
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("10.255.255.255", 1))
        found.add(probe.getsockname()[0])
    return sorted(a for a in found if not a.startswith("127.") and a != "0.0.0.0")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="voice-actors", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help="YAML config (default: config/default.yaml)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="start the Ray Serve ingress")
    p.add_argument("--address", help="Ray cluster to join (default: a running one, else start locally)")
    p.add_argument("--host", help="address to listen on (default server.host, 127.0.0.1; 0.0.0.0 for devices "
                                  "on your network)")
    p.add_argument("--port", type=int, help="port (default server.port, 8000)")
    p.add_argument("--gateway-port", type=int, help="also serve device sockets from the per-node device gateway "
                                                    "on this port, without the Serve proxy's hop (default "
                                                    "ingress.gateway_port, 0: off)")
    p.set_defaults(fn=_serve)

    p = sub.add_parser("turn", help="one full turn through a session actor")
    p.add_argument("wav", nargs="?", help="question as a WAV file (any rate, 16-bit)")
    p.add_argument("--text", help="ask in text instead of audio")
    p.add_argument("-o", "--out", default="reply.wav", help="where to write the reply audio")
    p.add_argument("--session", help="resume this session id")
    p.add_argument("--keep", action="store_true", help="keep the session actor alive afterwards")
    p.add_argument("--address", help="Ray cluster to join (default: a running one, else start locally)")
    p.set_defaults(fn=_turn)

    p = sub.add_parser("client", help="talk to a running server over a WebSocket, as a device would")
    p.add_argument("wav", nargs="?", help="question as a WAV file, streamed in real time")
    p.add_argument("--text", help="send text instead of audio (native protocol)")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    p.add_argument("--token", help=f"bearer token (default: {DEV_TOKEN_FILE} if present)")
    p.add_argument("--session", help="resume this session id (native protocol)")
    p.add_argument("--xiaozhi", action="store_true", help="speak the xiaozhi protocol with Opus (OTA first)")
    p.add_argument("--device-id", default="02:00:00:00:00:01", help="xiaozhi Device-Id (a MAC address)")
    p.add_argument("--protocol-version", type=int, default=1, choices=(1, 2, 3))
    p.add_argument("-o", "--out", default="reply.wav")
    p.set_defaults(fn=_client)

    p = sub.add_parser("say", help="write a speech WAV with the embedded voice")
    p.add_argument("text")
    p.add_argument("-o", "--out", default="question.wav")
    p.set_defaults(fn=_say)

    p = sub.add_parser("hash-password", help="print a password hash for auth.users.<name>.password_hash")
    p.add_argument("--password", help="(prompted for if omitted)")
    p.set_defaults(fn=_hash_password)

    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
