"""The coordinator's HTTP endpoint (aiohttp on the uvloop event loop): /metrics, /status, /checkpoints, downloads.

Binds 127.0.0.1 unless told otherwise. Only files of listed, complete checkpoints can be downloaded.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from peer.errors import UserError
from peer.store import checkpoint

DOWNLOADABLE = {"config.json", "model.safetensors", "bertswarm.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "vocab.txt"}  # fmt: skip


def make_app(service) -> web.Application:
    async def metrics(_request):
        body = generate_latest(service.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def status(_request):
        return web.json_response(service.status())

    async def checkpoints(_request):
        return web.json_response([info.to_dict() for info in checkpoint.list_checkpoints(service.checkpoint_root)])

    async def download(request):
        name, filename = request.match_info["name"], request.match_info["file"]
        listed = {info.name: info.path for info in checkpoint.list_checkpoints(service.checkpoint_root)}
        if name == "latest":
            latest = checkpoint.latest_path(service.checkpoint_root)
            name = latest.name if latest is not None else ""
        if name not in listed or filename not in DOWNLOADABLE or not (Path(listed[name]) / filename).is_file():
            raise web.HTTPNotFound(text="no such checkpoint file\n")
        return web.FileResponse(Path(listed[name]) / filename)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/status", status)
    app.router.add_get("/checkpoints", checkpoints)
    app.router.add_get("/checkpoints/{name}/{file}", download)
    return app


async def serve(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Start serving; returns the runner (for cleanup) and the bound port. A taken port is a user error."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        raise UserError(f"--http-port {port} on {host} is unavailable ({e.strerror}); pick a free port or 0") from None
    return runner, site._server.sockets[0].getsockname()[1]
