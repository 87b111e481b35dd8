"""A small stand-in for NDIF on 127.0.0.1, speaking the parts of its protocol that nnsight 0.8 uses.

Run as a separate process (``MockNDIF`` starts it): it loads the models it is told to serve, blocks any import
of ``workbench`` (NDIF's servers do not have the package, so a request must carry the workbench code it needs),
and answers:

- ``GET /subscribe`` (websocket): sends ``{"session_id": ...}``, then the status updates of that session's jobs
  as JSON text frames, and the COMPLETED update either as JSON carrying a result URL or as a binary frame
  (``ResponseModel.pickle()``) carrying the result bytes.
- ``POST /request`` (multipart: ``data`` = `RequestModel` JSON, ``blob`` = the serialised trace; header
  ``ndif-api-key``): answers the RECEIVED `ResponseModel`; the job then goes QUEUED -> RUNNING -> COMPLETED or
  ERROR. The trace really runs, against the served model, as on NDIF: deserialised with the server's
  persistent objects, executed, and its saved values returned (``torch.save``, zstd when the request asks).
- ``GET /response/{id}`` (the latest status of a job: nnsight's non-blocking mode), ``GET /result/{id}``,
  ``GET /status`` (deployments, as ``nnsight.status()`` reads them), ``GET /env`` (packages, for
  ``nnsight.compare()``), ``GET /whoami``.

Tests steer it with ``POST /_mock/scenario`` (delays, a gate that holds jobs in RUNNING until
``POST /_mock/release``, a forced job error, refusing the POST, dropping the websocket, result delivery inline or
by URL, padding the result, log lines, a drifted package version) and read ``GET /_mock/stats``.
"""

from __future__ import annotations

import importlib.abc
import json
import os
import subprocess
import sys
import time


class _NoWorkbench(importlib.abc.MetaPathFinder):
    """Makes ``import workbench`` fail in the server process, as on NDIF."""

    def find_spec(self, name, path=None, target=None):
        if name == "workbench" or name.startswith("workbench."):
            raise ModuleNotFoundError(f"No module named {name!r} (this mock NDIF server does not have it)")
        return None


DEFAULT_SCENARIO = {
    "delay": 0.0,  # seconds spent in QUEUED and before the result
    "gate": False,  # hold each job in RUNNING until POST /_mock/release
    "fail": None,  # make the job end in ERROR with this description
    "reject": None,  # [http_status, detail]: refuse the POST itself
    "disconnect_after": None,  # "QUEUED" or "RUNNING": close the websocket after sending that state
    "result": "inline",  # "inline" (binary websocket frame) or "url" (download from /result/{id})
    "pad_result_mb": 0,  # add this many MB of random bytes to the result
    "log": None,  # send a LOG update with this text while RUNNING
    "packages": {},  # override package versions reported by /env
}


# -- client side: start and steer the server from tests ---------------------------------------------------
class MockNDIF:
    """Start the mock server in a subprocess and steer it.

    Args:
        models: served hub id -> local model directory (Hugging Face format), optionally with the dtype to
            serve it in after "::" (e.g. "/tmp/m::bfloat16"; NDIF serves large models in bfloat16).
        api_key: the only key the server accepts.
    """

    def __init__(self, models: dict[str, str], api_key: str = "mock-key", log_path: str | None = None):
        self.models = models
        self.api_key = api_key
        self.log_path = log_path or os.devnull
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self, timeout: float = 180.0) -> MockNDIF:
        cmd = [sys.executable, __file__, "--api-key", self.api_key]
        for name, path in self.models.items():
            cmd += ["--model", f"{name}={path}"]
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log, env=env, text=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if line.startswith("READY "):
                self.url = line.split()[1]
                return self
            if not line and self.proc.poll() is not None:
                break
        self.stop()
        raise RuntimeError(f"the mock NDIF server did not start (see {self.log_path})")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
        if getattr(self, "_log", None):
            self._log.close()

    def _post(self, path: str, body: dict | None = None) -> dict:
        import httpx

        response = httpx.post(f"{self.url}{path}", json=body or {}, timeout=10)
        response.raise_for_status()
        return response.json()

    def scenario(self, **settings) -> None:
        """Set how the next jobs behave (keys of `DEFAULT_SCENARIO`; the rest reset to defaults)."""
        unknown = set(settings) - set(DEFAULT_SCENARIO)
        if unknown:
            raise ValueError(f"unknown scenario settings: {unknown}")
        self._post("/_mock/scenario", settings)

    def release(self) -> None:
        """Let gated jobs continue."""
        self._post("/_mock/release")

    def stats(self) -> dict:
        import httpx

        return httpx.get(f"{self.url}/_mock/stats", timeout=10).json()


# -- server side ----------------------------------------------------------------------------------------
def _serve(models: dict[str, str], api_key: str) -> None:  # pragma: no cover - runs in the subprocess
    import asyncio
    import io
    import threading
    import uuid
    from concurrent.futures import ThreadPoolExecutor

    import torch
    import tornado.web
    import tornado.websocket
    from nnsight import TransformersModel
    from nnsight.ndif import get_local_env
    from nnsight.schema.request import RequestModel
    from nnsight.schema.response import ResponseModel, Status
    from nnsight.tracing.tracer import dec, inc
    from transformers import AutoTokenizer

    torch.set_num_threads(1)
    served = {}
    for name, spec in models.items():
        path, _, dtype = spec.partition("::")
        tok = AutoTokenizer.from_pretrained(path)
        model = TransformersModel(
            path,
            task="text-generation",
            tokenizer=tok,
            attn_implementation="eager",
            dispatch=True,
            dtype=getattr(torch, dtype or "float32"),
        )
        model._module.eval()
        served[name] = (model, model._remoteable_persistent_objects())

    state = {
        "scenario": dict(DEFAULT_SCENARIO),
        "gate": threading.Event(),
        "sessions": {},
        "jobs": {},
        "results": {},
        "stats": {"requests": 0, "subscribes": 0, "completed": 0, "errors": 0, "model_keys": []},
    }
    worker = ThreadPoolExecutor(max_workers=1)  # one GPU, one job at a time
    loop_holder = {}

    def authorised(handler) -> bool:
        return handler.request.headers.get("ndif-api-key") == api_key

    def deliver(session_id: str, response: ResponseModel, binary: bool = False, close: bool = False) -> None:
        state["jobs"][response.id] = response if not binary else response.model_copy(update={"data": None})

        def send():
            handler = state["sessions"].get(session_id)
            if handler is None:
                return
            try:
                if binary:
                    handler.write_message(response.pickle(), binary=True)
                else:
                    handler.write_message(response.model_dump_json())
                if close:
                    handler.close()
            except tornado.websocket.WebSocketClosedError:
                pass

        loop_holder["loop"].add_callback(send)

    def execute(model, persistent, blob: bytes, compress: bool, env: dict) -> dict:
        model._remoteable_set_env(env)
        tracer = RequestModel.deserialize(blob, persistent, compress=compress)
        pushed: dict = {}

        class Recording(dict):
            def update(self, other=(), **kwargs):
                pushed.update(other, **kwargs)
                super().update(other, **kwargs)

        frame = tracer.info.frame
        frame.f_locals = Recording(frame.f_locals)
        inc()
        try:  # in grad mode, as on NDIF: a client's `torch.no_grad()` around the trace does not travel
            tracer.execute(tracer.info.code)
        finally:
            dec()
        return pushed

    def run_job(job_id: str, request: RequestModel, blob: bytes, scenario: dict, base_url: str) -> None:
        session = request.session_id

        def status(s: Status, description: str = "", **kw) -> None:
            deliver(session, ResponseModel(id=job_id, status=s, description=description, **kw))

        try:
            status(Status.QUEUED, "Your job is queued.")
            time.sleep(scenario["delay"])
            if scenario["disconnect_after"] == "QUEUED":
                deliver(
                    session, ResponseModel(id=job_id, status=Status.QUEUED, description="again"), close=True
                )
                return
            repo_id = json.loads(request.model_key.split(":", 1)[1]).get("repo_id")
            if repo_id not in served:
                state["stats"]["errors"] += 1
                status(Status.ERROR, f"Model {repo_id!r} is not deployed on this service.")
                return
            status(Status.RUNNING, "Your job has started running.")
            if scenario["log"]:
                status(Status.LOG, scenario["log"])
            if scenario["disconnect_after"] == "RUNNING":
                deliver(
                    session, ResponseModel(id=job_id, status=Status.RUNNING, description="..."), close=True
                )
                return
            if scenario["gate"]:
                state["gate"].wait(120)
            model, persistent = served[repo_id]
            try:
                saves = execute(model, persistent, blob, request.compress, request.env)
            except Exception as err:  # what a failing intervention looks like from the client
                state["stats"]["errors"] += 1
                status(Status.ERROR, f"{type(err).__name__}: {err}", meta={"gpu_seconds": 0.0})
                return
            if scenario["fail"]:
                state["stats"]["errors"] += 1
                status(Status.ERROR, scenario["fail"], meta={"gpu_seconds": 0.1})
                return
            if scenario["pad_result_mb"]:
                n = int(scenario["pad_result_mb"] * 2**20)
                saves["_padding"] = torch.randint(0, 255, (n,), dtype=torch.uint8)
            buffer = io.BytesIO()
            torch.save(saves, buffer)
            data = buffer.getvalue()
            if request.compress:
                import zstandard as zstd

                data = zstd.ZstdCompressor(level=3).compress(data)
            time.sleep(scenario["delay"])
            state["stats"]["completed"] += 1
            meta = {"gpu_seconds": 0.01}
            if scenario["result"] == "url" or not session:  # non-blocking jobs fetch results by URL
                state["results"][job_id] = data
                status(
                    Status.COMPLETED,
                    "Your job has been completed.",
                    data=f"{base_url}/result/{job_id}",
                    meta=meta,
                )
            else:
                done = ResponseModel(
                    id=job_id,
                    status=Status.COMPLETED,
                    description="Your job has been completed.",
                    data=data,
                    meta=meta,
                )
                deliver(session, done, binary=True)
        except Exception as err:  # keep the worker alive; say what broke
            status(Status.ERROR, f"mock server failure: {type(err).__name__}: {err}")

    class Subscribe(tornado.websocket.WebSocketHandler):
        def prepare(self):
            if not authorised(self):
                self.set_status(401)
                self.finish()

        def open(self):
            state["stats"]["subscribes"] += 1
            self.session_id = uuid.uuid4().hex
            state["sessions"][self.session_id] = self
            self.write_message(json.dumps({"session_id": self.session_id}))

        def on_close(self):
            state["sessions"].pop(self.session_id, None)

    class Request(tornado.web.RequestHandler):
        def post(self):
            state["stats"]["requests"] += 1
            if not authorised(self):
                self.set_status(401)
                self.write({"detail": "Invalid or missing NDIF API key."})
                return
            scenario = dict(state["scenario"])
            if scenario["reject"]:
                code, detail = scenario["reject"]
                self.set_status(code)
                self.write({"detail": detail})
                return
            request = RequestModel.model_validate_json(self.request.body_arguments["data"][0])
            blob = self.request.files["blob"][0]["body"]
            state["stats"]["model_keys"].append(request.model_key)
            job_id = uuid.uuid4().hex
            received = ResponseModel(
                id=job_id,
                status=Status.RECEIVED,
                description="Your job has been received and is waiting approval.",
            )
            state["jobs"][job_id] = received
            base_url = f"{self.request.protocol}://{self.request.host}"
            worker.submit(run_job, job_id, request, blob, scenario, base_url)
            self.set_header("Content-Type", "application/json")
            self.write(received.model_dump_json())

    class Response(tornado.web.RequestHandler):
        def get(self, job_id):
            if job_id not in state["jobs"]:
                self.set_status(404)
                self.write({"detail": "unknown job"})
                return
            self.set_header("Content-Type", "application/json")
            self.write(state["jobs"][job_id].model_dump_json())

    class Result(tornado.web.RequestHandler):
        def get(self, job_id):
            data = state["results"].get(job_id)
            if data is None:
                self.set_status(404)
                return
            self.set_header("Content-Type", "application/octet-stream")
            self.write(data)

    class StatusHandler(tornado.web.RequestHandler):
        def get(self):
            deployments = {}
            for name in served:
                key = "nnsight.modeling.transformers.TransformersModel:" + json.dumps(
                    {"repo_id": name, "revision": "main", "task": "text-generation"}
                )
                deployments[key] = {
                    "model_key": key,
                    "repo_id": name,
                    "revision": "main",
                    "task": "text-generation",
                    "deployment_level": "HOT",
                    "application_state": "RUNNING",
                }
            self.write({"deployments": deployments})

    local_env = get_local_env()

    class Env(tornado.web.RequestHandler):
        def get(self):
            packages = {k: v for k, v in local_env["packages"].items() if v != "local"}
            packages.update(state["scenario"]["packages"])
            self.write({"python_version": sys.version, "packages": packages})

    class WhoAmI(tornado.web.RequestHandler):
        def get(self):
            self.write({"email": "mock@example.org" if authorised(self) else None, "tags": []})

    class Scenario(tornado.web.RequestHandler):
        def post(self):
            state["scenario"] = {**DEFAULT_SCENARIO, **json.loads(self.request.body or b"{}")}
            state["gate"] = threading.Event()
            self.write({"ok": True})

    class Release(tornado.web.RequestHandler):
        def post(self):
            state["gate"].set()
            self.write({"ok": True})

    class Stats(tornado.web.RequestHandler):
        def get(self):
            self.write(state["stats"])

    app = tornado.web.Application(
        [
            (r"/subscribe", Subscribe),
            (r"/request", Request),
            (r"/response/([0-9a-f]+)", Response),
            (r"/result/([0-9a-f]+)", Result),
            (r"/status", StatusHandler),
            (r"/env", Env),
            (r"/whoami", WhoAmI),
            (r"/_mock/scenario", Scenario),
            (r"/_mock/release", Release),
            (r"/_mock/stats", Stats),
        ],
        websocket_max_message_size=2**30,
    )

    async def main():
        import tornado.httpserver
        import tornado.netutil

        loop_holder["loop"] = tornado.ioloop.IOLoop.current()
        sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
        server = tornado.httpserver.HTTPServer(app, max_body_size=2**30)
        server.add_sockets(sockets)
        port = sockets[0].getsockname()[1]
        print(f"READY http://127.0.0.1:{port}", flush=True)
        await asyncio.Event().wait()

    import tornado.ioloop

    asyncio.run(main())


if __name__ == "__main__":
    sys.meta_path.insert(0, _NoWorkbench())
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", action="append", default=[], help="NAME=DIR[::DTYPE]: serve DIR as hub id NAME"
    )
    parser.add_argument("--api-key", default="mock-key")
    args = parser.parse_args()
    _serve(dict(m.split("=", 1) for m in args.model), args.api_key)
