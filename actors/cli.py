"""`voice-actors`: run the server, run one spoken turn, or make a speech WAV.

    voice-actors serve                         # Ray Serve ingress on the embedded default
    voice-actors turn question.wav -o reply.wav
    voice-actors turn --text "What time is it?" -o reply.wav
    voice-actors say "Tell me about the Rosetta Stone." -o question.wav
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from actors.config import ConfigError, load_config


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
    from actors.runtime import connect_ray
    from serve_app import build_app

    config = load_config(args.config)
    print(f"ray: {connect_ray(config, args.address)}", file=sys.stderr)
    print("loading models...", file=sys.stderr)
    ensure_pools(config)
    serve.start(http_options={"host": config.server.host, "port": config.server.port})
    serve.run(build_app(config), name="voice-actors", route_prefix="/")
    print(f"voice-actors listening on http://{config.server.host}:{config.server.port} "
          "(Ctrl-C to stop)", file=sys.stderr)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="voice-actors", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help="YAML config (default: config/default.yaml)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="start the Ray Serve ingress")
    p.add_argument("--address", help="Ray cluster to join (default: a running one, else start locally)")
    p.set_defaults(fn=_serve)

    p = sub.add_parser("turn", help="one full turn through a session actor")
    p.add_argument("wav", nargs="?", help="question as a WAV file (any rate, 16-bit)")
    p.add_argument("--text", help="ask in text instead of audio")
    p.add_argument("-o", "--out", default="reply.wav", help="where to write the reply audio")
    p.add_argument("--session", help="resume this session id")
    p.add_argument("--keep", action="store_true", help="keep the session actor alive afterwards")
    p.add_argument("--address", help="Ray cluster to join (default: a running one, else start locally)")
    p.set_defaults(fn=_turn)

    p = sub.add_parser("say", help="write a speech WAV with the embedded voice")
    p.add_argument("text")
    p.add_argument("-o", "--out", default="question.wav")
    p.set_defaults(fn=_say)

    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
