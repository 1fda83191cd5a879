"""Ray Serve ingress: `serve run serve_app:app`.

Thin on purpose: routes, auth and hand-off to protocol adapters and session
actors. No wire format, dialogue or vendor API lives here.
"""

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, Field
from ray import serve

from actors.config import AppConfig, load_config

api = FastAPI(title="voice-actors", version="0.1.0")


class TextRequest(BaseModel):
    text: str = Field(min_length=1, max_length=4000)
    session_id: str | None = None


@serve.deployment(max_ongoing_requests=1000, graceful_shutdown_timeout_s=60)
@serve.ingress(api)
class VoiceIngress:
    def __init__(self, config_json: str) -> None:
        from actors.pools import ensure_pools
        from actors.sessions import SessionManager

        self.config = AppConfig.model_validate_json(config_json)
        ensure_pools(self.config)
        self.sessions = SessionManager(self.config)

    @api.get("/health")
    async def health(self) -> dict[str, Any]:
        return {"status": "ok"}

    @api.post("/api/text/process")
    async def text_process(self, body: TextRequest) -> dict[str, Any]:
        from actors.sessions import collect_turn

        sid, actor = self.sessions.open(body.session_id)

        async def send() -> bool:
            return await actor.send_text.remote(body.text) is not None

        result = await collect_turn(actor, send)
        return {"session_id": sid, "turn_id": result.turn_id, "reply": result.reply, "metrics": result.metrics,
                "errors": [e.model_dump(mode="json") for e in result.errors]}


def build_app(config: AppConfig | None = None) -> serve.Application:
    config = config or load_config()
    return VoiceIngress.bind(config.model_dump_json())


app = build_app()
