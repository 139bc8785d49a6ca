"""LitServe (the `bench` extra), as its documentation shows: an `ls.LitAPI` with `setup` (load the model
once per worker), `decode_request` (the uploaded file → the model's input), `batch` / `predict` /
`unbatch` (one forward per batch of up to `--max-batch-size` requests collected within `--batch-timeout`
seconds) and `encode_response` (the result as JSON), served by `ls.LitServer` with one inference worker
on the device and one API server process.

    python -m app.commands.peers.litserve_server --weights weights/mt-classify --port 8002

`POST /predict` (multipart field `file`) → the service's JSON result; `GET /health` → 200 once the worker
is ready.
"""

from typing import Any

import litserve as ls


class InspectAPI(ls.LitAPI):
    def __init__(self, weights: str, device: str, threads: int | None, **kwargs: Any):
        super().__init__(**kwargs)
        self.weights, self.device_name, self.threads = weights, device, threads

    def setup(self, device: str) -> None:
        from app.commands.peers.common import load

        self.predictor = load(self.weights, self.device_name, self.threads)

    def decode_request(self, request):  # unannotated: LitServe then hands over the Starlette form
        from app.commands.peers.common import prepare

        return prepare(self.predictor, request["file"].file.read())

    def batch(self, inputs: list) -> list:
        return list(inputs)  # Predictor.infer stacks the samples itself

    def predict(self, samples: list) -> list:
        raws = self.predictor.infer(samples)
        return [(raw, s.meta) for raw, s in zip(raws, samples, strict=True)]

    def unbatch(self, output: list) -> list:
        return output

    def encode_response(self, output):  # unannotated: LitServe then answers its JSON
        from app.commands.peers.common import answer

        raw, meta = output
        return answer(self.predictor, raw, meta)


def main(argv: list[str] | None = None) -> None:
    from app.commands.peers.common import parse_args

    args = parse_args("LitServe server", argv, max_batch_size=4, batch_timeout=0.005)
    api = InspectAPI(args.weights, args.device, args.threads, max_batch_size=args.max_batch_size,
                     batch_timeout=args.batch_timeout, api_path="/predict")
    accelerator = "cuda" if args.device.startswith("cuda") else "cpu"
    server = ls.LitServer(api, accelerator=accelerator, devices=1, workers_per_device=1, timeout=120)
    server.run(host="127.0.0.1", port=args.port, log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    main()
