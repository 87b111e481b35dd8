"""nnsight backends that turn one trace into one tracked NDIF job.

`backend_for(model)` is what `WorkbenchModel.trace` uses for remote models. It builds:

- `NDIFJobBackend` for ``remote=True`` (or a host URL): nnsight's blocking `RemoteBackend` protocol —
  open the ``/subscribe`` websocket, POST the serialised trace to ``/request``, read status updates
  (RECEIVED -> QUEUED -> ... -> RUNNING -> COMPLETED or ERROR) until the result arrives, inline or as a
  download URL. On top of nnsight it reports every update to the active `RemoteRunner`'s callback, wakes up
  a few times a second so that Stop and a timeout take effect while a job waits, caps the result size (inline
  results by their frame header, before they are read), refuses plain-http hosts other than this machine,
  loads results as data only (tensors, numbers, strings, containers: no pickled object can run code here),
  and turns transport failures into `RemoteError`s that say what to do.
- `LocalJobBackend` for ``remote="local"``: nnsight's serialising dry run, reported through the same updates.

Both ship the workbench's own code with the request (``nnsight.register("workbench")``): trace bodies call
workbench objects (``model.site(...)``), and NDIF's servers do not have the workbench installed. nnsight
registers only packages that are not pip-installed, and its ``remote="local"`` dry run cannot notice the
difference because an editable install stays importable while it hides local modules.
"""

from __future__ import annotations

import io
import json
import linecache
import pickle
import re
import sys
import time
import types
from typing import Any

import nnsight
import torch
from nnsight.intervention.backends.local import LocalSimulationBackend
from nnsight.intervention.backends.remote import _NNSIGHT_VERSION, RemoteBackend
from nnsight.intervention.backends.remote import RemoteError as NNsightRemoteError
from nnsight.ndif import pull_env
from nnsight.schema.request import RequestModel
from nnsight.schema.response import ResponseModel, Status
from torch._weights_only_unpickler import _get_allowed_globals

from workbench.errors import Cancelled, JobTooLarge, RemoteError
from workbench.remote.config import KEY_HELP, check_host, configured_key
from workbench.remote.jobs import JobUpdate, unreachable
from workbench.remote.runner import RemoteRunner, active_runner
from workbench.remote.service import served_models

# httpx and websocket-client are imported where a job goes over the network (dry runs with remote="local" never
# load them), zstandard where a compressed result is read.

_CONNECT_TIMEOUT = 10.0
_READ_TIMEOUT = 600.0
_CHUNK = 128 * 1024
_ENVELOPE = (
    64 * 1024
)  # what an inline result's websocket frame may add to the result itself (id, status, meta)


_SHIPPED = False
_OUT_OF_MEMORY = re.compile(r"out of memory|OutOfMemoryError", re.IGNORECASE)  # torch's words for it


def ship_workbench_by_value() -> None:
    """Send the workbench's code with remote requests (NDIF does not have the package installed)."""
    global _SHIPPED
    if not _SHIPPED:
        nnsight.register("workbench")
        _SHIPPED = True


def _detail(response) -> str:
    try:
        body = response.json()
        detail = body.get("detail") if isinstance(body, dict) else body
    except ValueError:
        detail = response.text
    return str(detail or response.reason_phrase or response.status_code)


def repo_id_of(model_key: str) -> str:
    """The hub id inside an nnsight model key (``"...TransformersModel:{json}"``)."""
    try:
        return json.loads(model_key.split(":", 1)[1]).get("repo_id", model_key)
    except (IndexError, ValueError, AttributeError):
        return model_key


def _served_hint(host: str, model_key: str) -> str:
    """A sentence naming what NDIF serves when the job's model is not among it ("" when unknown)."""
    try:
        served = served_models(host=host)
    except RemoteError:
        return ""
    names = sorted({m.repo_id for m in served})
    repo_id = repo_id_of(model_key)
    if repo_id in names:
        return ""
    listing = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "") if names else "nothing right now"
    return (
        f" NDIF does not serve {repo_id} at the moment; it serves: {listing}. Pick one of those "
        "(workbench.remote.served_models() lists them) or run the model locally."
    )


class _Tracked:
    """What both backends share: numbering, timing, and reporting to the runner."""

    runner: RemoteRunner
    model_name: str
    where: str

    def _begin(self) -> None:
        self.runner.raise_if_cancelled()
        self.number = self.runner._next_number()
        self.started = time.monotonic()
        self.job_id = ""
        self.state = "RECEIVED"
        self._last_emit = 0.0

    def _emit(self, state: str, description: str = "", *, log: bool = False, meta=None) -> JobUpdate:
        if not log:
            self.state = state
        update = JobUpdate(
            job_id=self.job_id or "",
            state=self.state,
            elapsed=time.monotonic() - self.started,
            description=description,
            number=self.number,
            model=self.model_name,
            where=self.where,
            log=log,
            meta=meta,
        )
        self._last_emit = time.monotonic()
        self.runner._report(update)
        return update


class NDIFJobBackend(_Tracked, RemoteBackend):
    """nnsight's blocking NDIF protocol, reported to a `RemoteRunner`, cancellable, with a timeout."""

    def __init__(self, model_key: str, runner: RemoteRunner, *, model_name: str, host=None, env=None):
        RemoteBackend.__init__(self, model_key, host=host, env=env, blocking=True)
        self.api_key = configured_key() or ""
        self.runner = runner
        self.model_name = model_name
        self.host = self.host.rstrip("/")
        self.where = "NDIF" if host is None else f"NDIF ({self.host})"
        # Our status line replaces nnsight's when someone listens (a widget); else nnsight's own display shows.
        self.display.enabled = self.display.enabled and runner.on_update is None

    # -- submission ----------------------------------------------------------------------------------
    def request(self, request, tracer) -> Any:
        check_host(self.host)
        if not self.api_key:
            raise RemoteError(f"No NDIF API key is configured. {KEY_HELP}")
        ship_workbench_by_value()
        drift = self.runner._check_versions(self.host)
        self._begin()
        if drift:
            self._emit("LOG", drift, log=True)
        try:
            return self._submit_and_wait(request, tracer)
        except RemoteError as err:
            if self.state not in ("ERROR", "TIMEOUT", "DISCONNECTED"):  # failed before the server said why
                self._emit("ERROR", str(err))
            raise

    def _submit_and_wait(self, request, tracer) -> Any:
        import websocket

        try:
            blob = self._serialize(tracer)
        except (pickle.PicklingError, TypeError, AttributeError) as err:
            raise RemoteError(
                f"The trace could not be packed for NDIF ({type(err).__name__}: {err}). Keep objects that "
                "cannot be sent (open files, locks, widgets, generators) out of `with model.trace(...)` bodies."
            ) from err
        header = {"ndif-api-key": self.api_key}
        try:
            connection = websocket.create_connection(
                f"{self.ws_host}/subscribe", header=header, timeout=_CONNECT_TIMEOUT
            )
        except websocket.WebSocketBadStatusException as err:
            if err.status_code in (401, 403):
                raise RemoteError(f"NDIF rejected the API key (HTTP {err.status_code}). {KEY_HELP}") from err
            raise unreachable(self.host, err) from err
        except (OSError, websocket.WebSocketException) as err:
            raise unreachable(self.host, err) from err
        _cap_frames(connection, self.runner.max_result_bytes + _ENVELOPE, self._too_large)
        try:
            request.session_id = json.loads(connection.recv())["session_id"]
            self.send(request, blob)
            connection.settimeout(self.runner.poll_interval)
            while True:
                try:
                    message = connection.recv()
                except websocket.WebSocketTimeoutException:
                    self._tick()
                    continue
                except (websocket.WebSocketConnectionClosedException, OSError) as err:
                    raise self._disconnected(err) from err
                if not message:  # the server closed the socket
                    raise self._disconnected(None)
                response = self.parse(message)
                result = self.handle(response)
                if response.status == Status.COMPLETED:
                    return result
        except NNsightRemoteError as err:  # raised by nnsight's own code paths (e.g. download errors)
            raise RemoteError(f"NDIF job {self.job_id} failed: {err}") from err
        finally:
            connection.close()

    def _post(self, request, blob: bytes) -> ResponseModel:
        """nnsight's POST /request, with errors that say what to do."""
        import httpx

        headers = {
            "ndif-timestamp": repr(time.time()),
            "nnsight-version": _NNSIGHT_VERSION,
            "python-version": sys.version,
            "ndif-api-key": self.api_key,
        }
        timeout = httpx.Timeout(_CONNECT_TIMEOUT, read=_READ_TIMEOUT)
        try:
            with httpx.Client(timeout=timeout) as client:
                response = client.post(
                    f"{self.host}/request",
                    data={"data": request.metadata()},
                    files={"blob": ("request", blob, "application/octet-stream")},
                    headers=headers,
                )
        except httpx.HTTPError as err:
            raise unreachable(self.host, err) from err
        if response.status_code in (401, 403):
            raise RemoteError(f"NDIF rejected the API key: {_detail(response)}. {KEY_HELP}")
        if response.status_code >= 500:
            raise RemoteError(
                f"NDIF at {self.host} could not take the job right now (HTTP {response.status_code}: "
                f"{_detail(response)}). Try again later; https://discuss.ndif.us announces outages."
            )
        if response.status_code == 413:
            raise JobTooLarge(f"NDIF refused the job as too large (HTTP 413): {_detail(response)}.")
        if response.status_code >= 400:
            raise RemoteError(
                f"NDIF refused the job (HTTP {response.status_code}): {_detail(response)}."
                + _served_hint(self.host, self.model_key)
            )
        return ResponseModel.model_validate_json(response.text)

    # -- status updates ------------------------------------------------------------------------------
    def note(self, response: ResponseModel) -> bool:
        if response.id and not self.job_id:
            self.job_id = response.id
        if response.meta is not None:
            self.meta = response.meta
        self.status = response.status
        self.display.update(response)
        if response.status == Status.LOG:
            self._emit("LOG", response.description, log=True, meta=response.meta)
            return False
        self._emit(response.status.value, response.description, meta=response.meta)
        if response.status == Status.ERROR:
            message = response.description or "no reason given"
            if _OUT_OF_MEMORY.search(message):  # smaller jobs may pass (a sweep splits its rows)
                raise JobTooLarge(f"NDIF job {self.job_id} failed on the server: {message}")
            raise RemoteError(
                f"NDIF job {self.job_id} failed on the server: {message}"
                + _served_hint(self.host, self.model_key)
            )
        return response.status == Status.COMPLETED

    def _tick(self) -> None:
        """Between updates: honour Stop and the timeout, and refresh the elapsed time."""
        elapsed = time.monotonic() - self.started
        if self.runner.cancelled:
            self._emit("CANCELLED", "stopped waiting; NDIF may still finish the job, its result is discarded")
            raise Cancelled(
                f"Stopped waiting for NDIF job {self.job_id} ({self.state} after {elapsed:.0f} s). NDIF has no "
                "cancel request; the job may still run there, and its result is discarded."
            )
        if self.runner.timeout is not None and elapsed > self.runner.timeout:
            last = self.state
            self._emit("TIMEOUT", f"no result after {elapsed:.0f} s")
            raise RemoteError(
                f"NDIF job {self.job_id} did not finish within timeout={self.runner.timeout:g} s (last state: "
                f"{last}). The queue may be long or the model still loading: raise the timeout, or try later."
            )
        self.display.refresh()
        if time.monotonic() - self._last_emit >= self.runner.tick_interval:
            self._emit(self.state)

    def _disconnected(self, err: BaseException | None) -> RemoteError:
        state = self.state
        self._emit(
            "DISCONNECTED", f"{type(err).__name__}: {err}" if err else "the server closed the connection"
        )
        return RemoteError(
            f"Lost the connection to NDIF while job {self.job_id or '(not yet accepted)'} was {state}. Its "
            "result cannot be collected. Running the call again sends all of its jobs again (only calls that "
            "completed are cached)."
        )

    # -- results -------------------------------------------------------------------------------------
    def _too_large(self, size: int) -> RemoteError:
        limit = self.runner.max_result_bytes
        return RemoteError(
            f"The result of NDIF job {self.job_id} is {size / 2**20:,.1f} MB, above the limit of "
            f"{limit / 2**20:,.0f} MB (max_result_mb). Save less inside the trace (only the positions, layers "
            "or heads you need; engines: a smaller memory_budget), or raise max_result_mb."
        )

    def download_result(self, url) -> Any:
        limit = self.runner.max_result_bytes
        if isinstance(url, (bytes, bytearray)):
            if len(url) > limit:
                raise self._too_large(len(url))
            return self.finalize(bytes(url))
        if not url:
            raise RemoteError(f"NDIF job {self.job_id} completed without a result.")

        import httpx

        buffer = io.BytesIO()
        try:
            with httpx.Client(timeout=httpx.Timeout(_CONNECT_TIMEOUT, read=_READ_TIMEOUT)) as client:
                with client.stream("GET", url) as response:
                    response.raise_for_status()
                    declared = int(response.headers.get("Content-Length") or 0)
                    if declared > limit:
                        raise self._too_large(declared)
                    for chunk in response.iter_bytes(chunk_size=_CHUNK):
                        buffer.write(chunk)
                        if buffer.tell() > limit:
                            raise self._too_large(buffer.tell())
                        if self.runner.cancelled:
                            self._tick()
        except httpx.HTTPError as err:
            raise RemoteError(
                f"Could not download the result of NDIF job {self.job_id} ({type(err).__name__}: {err})."
            ) from err
        return self.finalize(buffer.getvalue())

    def parse(self, message) -> ResponseModel:
        """One websocket message as a `ResponseModel`; a binary one (an inline result) is loaded as data only."""
        if isinstance(message, (bytes, bytearray)):
            return ResponseModel(**load_data_only(bytes(message), f"NDIF job {self.job_id}'s response"))
        return ResponseModel.model_validate_json(message)

    def finalize(self, content: bytes) -> Any:
        """Decompress (bounded by max_result_mb) and load a result blob as data only."""
        limit = self.runner.max_result_bytes
        if self.compress:
            import zstandard as zstd

            size = zstd.frame_content_size(content)
            if size > limit:
                raise self._too_large(size)
            try:
                content = zstd.ZstdDecompressor().decompress(content, max_output_size=limit)
            except zstd.ZstdError as err:
                raise RemoteError(
                    f"The result of NDIF job {self.job_id} could not be decompressed within max_result_mb ({err})."
                ) from err
        return _detached(load_data_only(content, f"the result of NDIF job {self.job_id}"))


def _cap_frames(connection, limit: int, too_large) -> None:
    """Make a websocket refuse a message longer than `limit` bytes as soon as its frame header says so, before
    the payload is read (websocket-client would otherwise receive it in full)."""
    from websocket._abnf import frame_buffer

    class Capped(frame_buffer):
        pending = 0  # bytes of the message so far, when it is split into several frames

        def recv_length(self) -> None:
            super().recv_length()
            fin, opcode = self.header[0], self.header[4]
            if opcode >= 0x8:  # control frames (ping, pong, close): at most 125 bytes, not part of a message
                return
            total = self.pending + self.length
            if total > limit:
                raise too_large(total)
            self.pending = 0 if fin else total

    old = connection.frame_buffer
    connection.frame_buffer = Capped(old.recv, old.skip_utf8_validation)


def _allowed_globals() -> dict[str, Any]:
    return {**_get_allowed_globals(), "nnsight.schema.response.Status": Status}


class _DataOnlyUnpickler(pickle.Unpickler):
    """An unpickler that can only build what torch's ``weights_only`` loader builds (tensors, numbers, strings,
    bytes, lists, tuples, dicts) plus nnsight's job `Status`: a pickle cannot name a function for it to call.
    Unlike ``torch.load(weights_only=True)`` it reads pickle protocol 4, which nnsight's responses use."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = _allowed_globals()
        key = f"{module}.{name}"
        if key not in allowed:
            raise pickle.UnpicklingError(f"{key} is not allowed")
        return allowed[key]


_DATA_ONLY_PICKLE = types.SimpleNamespace(
    __name__="workbench_data_only_pickle", Unpickler=_DataOnlyUnpickler, load=pickle.load
)


def load_data_only(content: bytes, what: str) -> Any:
    """Load ``torch.save`` bytes from NDIF without running anything they name; `RemoteError` otherwise."""
    try:
        return torch.load(
            io.BytesIO(content), map_location="cpu", weights_only=False, pickle_module=_DATA_ONLY_PICKLE
        )
    except pickle.UnpicklingError as err:
        raise RemoteError(
            f"{what} holds an object the workbench does not load ({err}). NDIF results are loaded as data only "
            "(tensors, numbers, strings, lists, tuples, dicts) so that a result cannot run code on this "
            "machine: save tensors inside the trace (e.g. `model.site(...).value.save()`), not other objects."
        ) from None
    except Exception as err:  # a truncated or corrupt blob
        raise RemoteError(f"{what} could not be read ({type(err).__name__}: {err}).") from None


def _detached(value: Any) -> Any:
    """Saved values without autograd history: NDIF runs traces in grad mode, and a graph cannot come back."""
    if isinstance(value, torch.Tensor):
        return value.detach() if value.requires_grad else value
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and type(value) in (list, tuple):
        return type(value)(_detached(v) for v in value)
    return value


class LocalJobBackend(_Tracked, LocalSimulationBackend):
    """nnsight's ``remote="local"`` dry run, reported through the same updates as an NDIF job.

    As nnsight's `LocalSimulationBackend`: serialise the trace as for NDIF, deserialise it with local modules
    hidden, run it here. One difference makes it closer to what NDIF does: the shipped block runs under its own
    file name with the shipped source in `linecache`, as on the server. nnsight's version runs the shipped code
    against the original file's lines, so a nested ``with loss.backward():`` block is looked up at the wrong
    line (``ast.unparse`` drops comments and blank lines) and fails only in the dry run.
    """

    def __init__(self, nnsight_model, runner: RemoteRunner, *, model_name: str):
        LocalSimulationBackend.__init__(self, nnsight_model)
        self.runner = runner
        self.model_name = model_name
        self.where = "local dry run"

    def __call__(self, tracer) -> None:
        ship_workbench_by_value()
        self._begin()
        self.job_id = f"local-{self.number}"
        self._emit("RECEIVED")
        self._emit("RUNNING", "serialised as for NDIF; running on this machine")
        try:
            self._run(tracer)
        except Exception as err:
            self._emit("ERROR", f"{type(err).__name__}: {err}")
            raise
        self._emit("COMPLETED")

    def _run(self, tracer) -> None:
        pull_env()
        blob = RequestModel.serialize(tracer, compress=False)
        persistent = self.model._remoteable_persistent_objects()
        filename = tracer.info.frame.f_code.co_filename
        saved_lines = linecache.cache.get(filename)
        hidden = self._hide_local_modules()
        try:
            restored = RequestModel.deserialize(blob, persistent, compress=False)
            source = "".join(linecache.cache[filename][2])  # what deserialize registered: the shipped block
        finally:
            self._restore(hidden)
            if saved_lines is not None:
                linecache.cache[filename] = saved_lines
            else:
                linecache.cache.pop(filename, None)
        shipped = f"<workbench dry run {self.job_id}> {filename}"
        linecache.cache[shipped] = (len(source), None, source.splitlines(keepends=True), shipped)
        try:
            tracer.info.code = compile(source, shipped, "exec").replace(co_name=restored.info.code.co_name)
            tracer.execute(tracer.info.code)
        finally:
            linecache.cache.pop(shipped, None)


def backend_for(model, remote: bool | str | None = None, runner: RemoteRunner | None = None):
    """The backend a remote trace of `model` (a `WorkbenchModel`) runs through, reporting to `runner` (the
    trace's `Run.reporter`), else to the `RemoteRunner` active in this context (``with RemoteRunner(...):``),
    else to a new one that prints nnsight's own status line."""
    remote = model.remote if remote is None else remote
    runner = runner or active_runner()
    if remote == "local":
        return LocalJobBackend(model.nnsight, runner, model_name=model.name)
    if not remote:
        raise RemoteError(f"{model.name!r} is a local model; load it with remote=True to run it on NDIF.")
    nn = model.nnsight
    if not hasattr(nn, "to_model_key"):
        raise RemoteError(f"{model.name!r} is a plain torch module; NDIF runs only the hub models it hosts.")
    try:
        model_key = nn.to_model_key()
    except Exception as err:  # HFValidationError for in-memory models, network errors for hub lookups
        raise RemoteError(
            f"Cannot name {model.name!r} for NDIF ({type(err).__name__}: {err}). NDIF runs models it hosts, "
            "named by their hub id: load_model('openai-community/gpt2', remote=True). Models built in memory "
            "or from a local directory can run with remote='local' (a dry run) only."
        ) from err
    host = remote if isinstance(remote, str) else None
    return NDIFJobBackend(model_key, runner, model_name=model.name, host=host, env=nn._remoteable_get_env())
