"""Baseline (b): a bare Ray Serve WebSocket echo, the floor of the ingress path.

Same proxy, same FastAPI-under-Serve route style as serve_app, no session:
what it costs per socket is what any voice server on Ray Serve must pay.
"""

from fastapi import FastAPI, WebSocket
from fastapi.websockets import WebSocketDisconnect
from ray import serve

echo_api = FastAPI()


@serve.deployment(max_ongoing_requests=2000)
@serve.ingress(echo_api)
class EchoIngress:
    @echo_api.websocket("/")
    async def echo(self, ws: WebSocket) -> None:
        await ws.accept()
        try:
            while True:
                msg = await ws.receive()
                if msg["type"] == "websocket.disconnect":
                    return
                if msg.get("bytes") is not None:
                    await ws.send_bytes(msg["bytes"])
                elif msg.get("text") is not None:
                    await ws.send_text(msg["text"])
        except WebSocketDisconnect:
            return


echo_app = EchoIngress.bind()
