"""The annotation page's HTTP side: FastAPI on uvicorn, bound to this machine by default.

Requests name images by their index in the list made at start-up, never by a path, so no request can
reach a file outside the folder; the page's own files are served from the package. Every bad request
gets ``{"error": ...}`` with a 4xx status, never a traceback.
"""

from __future__ import annotations

import base64
import binascii
import errno
import socket
import time
import unicodedata
import webbrowser
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field, field_validator
from starlette.exceptions import HTTPException

from sam4med.annotate.session import (AnnotationSession, SavedObject, decode_mask_png, encode_png,
                                      hidden_under_later, open_frames)
from sam4med.engine.errors import InputError, check_precision, check_tiling, one_line, refused_by_file_system
from sam4med.engine.interactive import Correction, check_correction
from sam4med.engine.prompts import Prompt

STATIC = Path(__file__).parent / "static"
# a request carries at most a few masks as PNG (a 10000 x 10000 label image is a few MB); a larger body is refused
# before it is read, rather than held in memory several times over while it is parsed
MAX_REQUEST_BYTES = 256 << 20


class SegmentRequest(BaseModel):
    object: int = Field(ge=0)
    box: list[float] | None = None
    points: list[list[float]] | None = None
    labels: list[int] | None = None
    refine: bool = True


class ObjectMask(BaseModel):
    label: str = Field(min_length=1, max_length=200)
    mask: str  # base64 PNG

    @field_validator("label")
    @classmethod
    def visible_name(cls, label: str) -> str:
        """A name is shown on the page and kept in ``labels/<id>.json`` for other tools: a blank one names
        nothing, and a newline or NUL in it breaks the lines and tables it ends up in."""
        if not label.strip():
            raise ValueError("an object's name needs a visible character")
        if any(unicodedata.category(character) == "Cc" for character in label):
            raise ValueError("an object's name must not hold control characters (a newline, a tab, NUL)")
        return label


class PropagateRequest(ObjectMask):
    first: int | None = None  # slice range, inclusive; default the whole volume
    last: int | None = None


class SaveRequest(BaseModel):
    objects: list[ObjectMask]


class ForgetRequest(BaseModel):
    object: int = Field(ge=0)


class EverythingRequest(BaseModel):
    taken: str | None = None  # base64 PNG: the pixels of the objects on the page, which found objects leave out


def create_app(session: AnnotationSession) -> FastAPI:
    """The page, its files and the JSON API over one session."""
    # max_body_size counts a body as it streams in, which a chunked request (no Content-Length) needs
    app = FastAPI(title="sam4med annotate", docs_url=None, redoc_url=None, openapi_url=None,
                  max_body_size=MAX_REQUEST_BYTES)

    def too_large(body: str) -> JSONResponse:
        return JSONResponse({"error": f"request body {body}: more than the {MAX_REQUEST_BYTES} a request may carry"},
                            status_code=413)

    @app.middleware("http")
    async def limit_body(request: Request, call_next):  # type: ignore[no-untyped-def]
        length = request.headers.get("content-length", "0")
        if not length.isdigit() or int(length) > MAX_REQUEST_BYTES:  # refused before a byte of it is read
            return too_large(f"of {length} bytes")
        return await call_next(request)

    @app.exception_handler(InputError)
    async def bad_input(_: Request, error: InputError) -> JSONResponse:
        return JSONResponse({"error": one_line(error)}, status_code=400)

    @app.exception_handler(KeyError)
    async def unknown_image(_: Request, error: KeyError) -> JSONResponse:
        return JSONResponse({"error": f"no image {error.args[0]} in this folder"}, status_code=404)

    @app.exception_handler(RequestValidationError)
    async def malformed(_: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {"loc": (), "msg": "malformed request"}
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
        return JSONResponse({"error": f"{where or 'request'}: {first.get('msg')}"}, status_code=422)

    @app.exception_handler(OSError)
    async def refused_by_disk(_: Request, error: OSError) -> JSONResponse:
        """The folder refused a write (a full or read-only disk, a file where a folder must go): the page says which
        file and why, and what was saved before stays as it was."""
        status = 409 if isinstance(error, (FileExistsError, NotADirectoryError)) else \
            {errno.ENOSPC: 507, errno.EROFS: 403, errno.EACCES: 403, errno.EPERM: 403}.get(error.errno, 500)
        return JSONResponse({"error": refused_by_file_system(error, session.root)}, status_code=status)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, error: HTTPException) -> JSONResponse:
        if error.status_code == 413:  # a streamed body that grew past the limit
            return too_large("sent in chunks")
        return JSONResponse({"error": str(error.detail)}, status_code=error.status_code)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/api/state")
    def state() -> dict[str, object]:
        listing = session.listing()
        return {"folder": str(session.root), "model": session.model.spec.name, "clicks": session.takes_clicks,
                "volume": session.frames.volume,
                "images": listing, "annotated": sum(bool(i["annotated"]) for i in listing), "total": len(listing)}

    @app.get("/api/progress")
    def progress() -> dict[str, object]:
        """What the page shows while a long request runs: which (everything, propagate), on which image, and its
        steps done of all (tiles, slices)."""
        return session.progress or {"task": None, "image": None, "done": 0, "total": None}

    @app.get("/api/images/{index}")
    def describe(index: int) -> dict[str, object]:
        return session.describe(index)

    @app.get("/api/images/{index}/pixels")
    def pixels(index: int, low: float | None = None, high: float | None = None) -> Response:
        return Response(session.display_png(index, low, high), media_type="image/png",
                        headers={"Cache-Control": "no-store"})

    @app.get("/api/images/{index}/objects")
    def saved(index: int) -> dict[str, object]:
        return {"objects": [{"label": o.label, "mask": _png64(o.mask)} for o in session.saved_objects(index)],
                "versions": session.versions(index)}

    @app.post("/api/images/{index}/open")
    def open_image(index: int) -> dict[str, object]:
        return {"index": index, "seconds": round(session.open(index), 3)}

    @app.post("/api/images/{index}/segment")
    def segment(index: int, request: SegmentRequest) -> dict[str, object]:
        start = time.perf_counter()
        prompt = Prompt(points=request.points or None, labels=request.labels if request.points else None,
                        box=request.box)
        mask, iou = session.segment(index, request.object, prompt, request.refine)
        return {"mask": _png64(mask), "area": int(mask.sum()), "iou": round(iou, 4),
                "seconds": round(time.perf_counter() - start, 3)}

    @app.post("/api/images/{index}/forget")
    def forget(index: int, request: ForgetRequest) -> dict[str, object]:
        session.forget(index, request.object)
        return {"index": index, "object": request.object}

    @app.post("/api/images/{index}/everything")
    def everything(index: int, request: EverythingRequest) -> dict[str, object]:
        start = time.perf_counter()
        taken = None if request.taken is None else decode_mask_png(_unbase64(request.taken, "taken"), "taken")
        found = session.everything(index, taken)
        return {"objects": [{"mask": _png64(o.mask), "box": list(o.box), "area": int(o.mask.sum()),
                             "iou": round(o.predicted_iou, 4), "stability": round(o.stability, 4)} for o in found],
                "seconds": round(time.perf_counter() - start, 3)}

    def objects_of(sent: list[ObjectMask]) -> list[SavedObject]:
        return [SavedObject(o.label, decode_mask_png(_unbase64(o.mask, f"object '{o.label}'"), f"object '{o.label}'"))
                for o in sent]

    @app.post("/api/images/{index}/save")
    def save(index: int, request: SaveRequest) -> dict[str, object]:
        objects = objects_of(request.objects)
        path = session.save(index, objects)
        listing = session.listing()
        return {"saved": str(path.relative_to(session.root)), "annotated": sum(bool(i["annotated"]) for i in listing),
                "total": len(listing), "versions": session.versions(index), "hidden": hidden_under_later(objects)}

    @app.post("/api/images/{index}/propagate")
    def propagate(index: int, request: PropagateRequest) -> dict[str, object]:
        [obj] = objects_of([request])
        return {**session.propagate(index, obj, request.first, request.last), "images": session.listing()}

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _png64(mask) -> str:  # type: ignore[no-untyped-def]
    return base64.b64encode(encode_png(mask.astype("uint8") * 255)).decode("ascii")


def _unbase64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text.split(",", 1)[-1], validate=True)  # a data: URL or bare base64
    except (binascii.Error, ValueError):
        raise InputError(f"{what}: mask is not base64") from None


def annotate_folder(folder: str | Path, model: str, checkpoint: str | Path | None = None, device: str | None = None,
                    host: str = "127.0.0.1", port: int = 8765, open_browser: bool = False,
                    encoder_backend: str = "torch", tile: int | None = None, halo: int = 32,
                    precision: str = "fp32", correction: Correction = "auto") -> None:
    """``sam4med annotate``: check the folder, port and tiling, load the model, serve the page until interrupted.
    ``correction``: what a corrective click may change (``engine.interactive``)."""
    from sam4med.engine.models import load_model

    check_address(host, port)
    check_tiling(tile, halo)
    check_precision(precision)
    check_correction(correction)
    frames = open_frames(folder)  # a folder without images, or a damaged volume, fails before the model loads
    sam = load_model(model, checkpoint, device, encoder_backend=encoder_backend, precision=precision)
    serve(AnnotationSession(frames, sam, tile=tile, halo=halo, correction=correction), host, port, open_browser)


def check_address(host: str, port: int) -> None:
    """The page can be served at ``host:port`` (a known address, a free port), checked before the model loads."""
    if not 1 <= port <= 65535:
        raise InputError(f"--port {port}: must be 1..65535")
    try:
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as error:
        raise InputError(f"--host {host!r}: not an address of this machine ({one_line(error)})") from None
    with socket.socket(family, kind) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server sets it
        try:
            probe.bind(address)
        except OSError as error:
            raise InputError(f"--host {host} --port {port}: cannot listen there ({error.strerror or one_line(error)})"
                             ) from None


def serve(session: AnnotationSession, host: str = "127.0.0.1", port: int = 8765, open_browser: bool = False) -> None:
    """Serve the page until interrupted; prints its address first."""
    import uvicorn

    address = f"http://{host}:{port}/"
    print(f"sam4med annotate: {session.root} ({len(session.frames.ids)} frames, model {session.model.spec.name}) at "
          f"{address}  (Ctrl+C stops)", flush=True)
    if open_browser:
        webbrowser.open(address)
    uvicorn.run(create_app(session), host=host, port=port, log_level="warning")
