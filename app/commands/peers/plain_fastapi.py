"""A plain FastAPI server, as FastAPI's documentation shows one: the model loaded in the lifespan, a
`def` endpoint (run on FastAPI's thread pool, as its docs advise for blocking work) taking an `UploadFile`,
one forward per request, one uvicorn process. `Predictor.infer` runs one call at a time (its contract), so
the forwards take turns behind a lock while decoding and answering run on the pool's threads.

    python -m app.commands.peers.plain_fastapi --weights weights/mt-classify --port 8001

`POST /predict` (multipart field `file`) → the service's JSON result; `GET /health` → 200 once loaded.
"""

import contextlib
import threading
from typing import Any

from fastapi import FastAPI, File, UploadFile


def build_app(weights: str, device: str, threads: int | None) -> FastAPI:
    from app.commands.peers.common import answer, load, prepare

    state: dict[str, Any] = {}
    forward = threading.Lock()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        state["predictor"] = load(weights, device, threads)
        yield
        state.clear()

    app = FastAPI(lifespan=lifespan)

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/predict")
    def predict(file: UploadFile = File(...)) -> dict[str, Any]:  # noqa: B008 - FastAPI's documented form
        predictor = state["predictor"]
        sample = prepare(predictor, file.file.read())
        with forward:
            raw = predictor.infer([sample])[0]
        return answer(predictor, raw, sample.meta)

    return app


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    from app.commands.peers.common import parse_args

    args = parse_args("plain FastAPI server: one forward per request", argv)
    uvicorn.run(build_app(args.weights, args.device, args.threads), host="127.0.0.1", port=args.port,
                log_level="warning")


if __name__ == "__main__":
    main()
