"""``bertswarm-serve``: serve a run's newest checkpoint over HTTP (fill-mask, classification), reloading it when a
newer one is published. User errors (bad flags, a port in use) are one line on stderr and exit code 2."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from peer.cli import build_parser, parse_config, run_command, setup_logging
from serve.config import ServeConfig

logger = logging.getLogger(__name__)

GROUPS = {"serve": "serving"}
DESCRIPTION = (
    "Serve a bertswarm run's newest checkpoint over HTTP: POST /v1/fill-mask and /v1/classify with "
    '{"inputs": [text, ...]}; /healthz, /readyz, /metrics. A newer checkpoint is verified and swapped in without '
    "dropping a request."
)


async def run(cfg: ServeConfig) -> None:
    from serve import app as serve_app

    server = serve_app.Server(cfg.checkpoints, max_batch=cfg.max_batch, batch_window_ms=cfg.batch_window_ms,
                              poll_seconds=cfg.poll_seconds, threads=cfg.threads)  # fmt: skip
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    runner, port = await serve_app.serve(server.make_app(), cfg.host, cfg.port, cfg.shutdown_seconds)
    try:
        server.start()
        print(f"bertswarm-serve: serving {cfg.checkpoints} on http://{cfg.host}:{port} (POST /v1/fill-mask, "
              "/v1/classify; /readyz, /metrics)", flush=True)  # fmt: skip
        await stop.wait()
        logger.info("stopping: in-flight requests get %gs", cfg.shutdown_seconds)
    finally:
        try:  # stop listening, let in-flight requests finish (the batcher still runs), then stop the workers
            await asyncio.wait_for(runner.cleanup(), cfg.shutdown_seconds + 1)
        except TimeoutError:
            logger.warning("in-flight requests did not finish within %gs; stopping anyway", cfg.shutdown_seconds)
        finally:
            await server.stop()


def main(argv: list[str] | None = None) -> int:
    def body() -> None:
        parser = build_parser(ServeConfig, "bertswarm-serve", DESCRIPTION, GROUPS)
        cfg, _ = parse_config(argv, parser=parser, config_cls=ServeConfig)
        setup_logging()
        import uvloop

        uvloop.run(run(cfg))

    return run_command("bertswarm-serve", body, None)


if __name__ == "__main__":
    sys.exit(main())
