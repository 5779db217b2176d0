"""``maskrcnn serve``: an HTTP service (Starlette + uvicorn) around a loaded model, with a static web page.

Endpoints:

- ``POST /v1/predict``: an image as the raw body or as the multipart field ``image``; query (or form) parameters
  ``score_threshold``, ``max_detections`` and ``mask_format`` (``rle``, ``polygon`` or ``none``). Returns
  ``{"model", "image": {"width", "height"}, "detections": [{"category_id", "label", "name", "score",
  "box": [x1, y1, x2, y2] (input pixels), "mask", "keypoints": [[x, y, score], ...]}], "inference_ms"}``; the mask
  with a mask head, the keypoints (input pixels, the model's score) with a keypoint head, which also adds
  ``"keypoint_names"``, ``"skeleton"`` (pairs of 0-based keypoint indices) and ``"keypoint_threshold"`` (the score
  under which drawings skip a joint) at the top level.
- KServe / Open Inference Protocol v2: ``GET /v2/health/live``, ``GET /v2/health/ready``,
  ``GET /v2/models/{name}``, ``POST /v2/models/{name}/infer`` (input ``image``: UINT8 [H, W, 3]; outputs
  ``boxes`` FP32 [N, 4], ``scores`` FP32 [N], ``labels`` INT64 [N], and ``keypoints`` FP32 [N, K, 3] with a
  keypoint head).
- ``GET /``: the page in ``static/`` (no external assets).

Every error is JSON ``{"error": "..."}`` with its status: 400 bad input, 401 missing or wrong API key, 413 body or
image too large, 415 not an image, 503 queue full (with ``Retry-After``), 504 past the request timeout.
Inference runs in a worker thread, so the event loop (and the health endpoints) keep answering; uvicorn drains
requests in flight on SIGTERM before it stops.
"""

from __future__ import annotations

import asyncio
import hmac
import io
import json
import math
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

STATIC_DIR = Path(__file__).parent / "static"
MASK_FORMATS = ("rle", "polygon", "none")
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class ServeSettings:
    """Limits and security of the service. Sizes in bytes and pixels, times in seconds."""

    # Largest request body accepted (413 above it).
    max_body_bytes: int = 20 * 1024 * 1024
    # Largest decoded image, width x height (413 above it; also stops decompression bombs before decoding).
    max_pixels: int = 40_000_000
    # Requests waiting for the model beyond the one running; more get 503 with Retry-After.
    max_queue: int = 8
    # Seconds a request may wait and run before it gets 504.
    request_timeout_s: float = 60.0
    # Threads running the model (one: the model's own intra-op threads use the cores).
    workers: int = 1
    # When set, every endpoint but the page and the health checks needs "Authorization: Bearer <key>" or
    # "X-API-Key: <key>".
    api_key: str | None = None
    # Origins allowed by CORS; empty: CORS off.
    cors_origins: tuple[str, ...] = ()
    # Default of score_threshold when a request gives none.
    score_threshold: float = 0.5


class HTTPError(Exception):
    """An error the client gets as JSON ``{"error": message}`` with ``status`` (and optional headers)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        """``status``: HTTP status code; ``message``: what went wrong, for the client."""
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Encoded image bytes -> (H, W, 3) uint8 RGB (EXIF orientation applied); raises HTTPError 400/413/415."""
    from PIL import Image, ImageOps, UnidentifiedImageError  # noqa: PLC0415

    if not data:
        raise HTTPError(400, "empty body: send an image (PNG, JPEG, ...) as the body or as the form field 'image'")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise HTTPError(415, "the body is not an image format this service reads (PNG, JPEG, BMP, TIFF, WebP, ...)"
                        ) from None
    except Image.DecompressionBombError as e:
        raise HTTPError(413, f"image too large: {e}") from None
    except Exception as e:  # noqa: BLE001 - Pillow raises many types for broken headers
        raise HTTPError(400, f"cannot read the image header: truncated or corrupt ({type(e).__name__}: {e})"
                        ) from None
    width, height = img.size
    # Checked on the header, before any pixel is decoded: a small file may declare a huge image.
    if width * height > max_pixels:
        raise HTTPError(413, f"image of {width}x{height} = {width * height} pixels is larger than the limit of "
                             f"{max_pixels} pixels")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
        img = ImageOps.exif_transpose(img)
        return np.asarray(img.convert("RGB"))
    except Exception as e:  # noqa: BLE001 - truncated or corrupt data: any decoder error is the client's
        raise HTTPError(400, f"cannot decode the image: truncated or corrupt ({type(e).__name__}: {e})") from None


def mask_to_polygons(mask: np.ndarray) -> list[list[float]]:
    """(H, W) bool mask -> COCO polygons ([x0, y0, x1, y1, ...] in pixel coordinates) of its outlines."""
    import contourpy  # noqa: PLC0415

    # Padding closes outlines that touch the border. The 0.5 level runs half way between pixel centres: a vertex
    # at padded index i is at mask index i - 1, whose pixel covers [i - 1, i), centre i - 0.5; so on a straight
    # edge between mask pixels 3 and 4 it lies at index 4.5 and pixel coordinate 4.0: subtract 0.5.
    padded = np.pad(mask.astype(np.float32), 1)
    lines = contourpy.contour_generator(z=padded, name="serial").lines(0.5)
    out = []
    for line in lines:
        if len(line) >= 3:
            out.append([round(float(v) - 0.5, 2) for v in line.reshape(-1)])
    return out


class ModelService:
    """The loaded model, a bounded queue in front of it, and the JSON it returns."""

    def __init__(self, model: Any, name: str, settings: ServeSettings) -> None:
        """``model``: anything with ``predict(image, score_threshold=...)`` and ``cfg`` (PyTorch or ONNX)."""
        self.model = model
        self.name = name
        self.settings = settings
        self.executor = ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="maskrcnn-infer")
        self.pending = 0  # requests admitted and not yet answered (event-loop thread only)
        self.ready = True
        self.latency_s = 1.0  # running mean of inference time, for Retry-After
        self._lock = threading.Lock()

    def admit(self) -> None:
        """Count a request in, or raise 503 with Retry-After when the queue is full."""
        capacity = self.settings.workers + self.settings.max_queue
        if self.pending >= capacity:
            retry = max(1, math.ceil(self.latency_s * (self.pending - self.settings.workers + 1)
                                     / self.settings.workers))
            raise HTTPError(503, f"busy: {self.pending} requests are queued or running (limit {capacity}); retry "
                                 f"after {retry} s", {"Retry-After": str(retry)})
        self.pending += 1

    def release(self) -> None:
        """Count a request out."""
        self.pending -= 1

    def _infer(self, image: np.ndarray, score_threshold: float) -> tuple[Any, float]:
        start = time.perf_counter()
        result = self.model.predict(image, score_threshold=score_threshold)[0]
        seconds = time.perf_counter() - start
        with self._lock:
            self.latency_s = 0.8 * self.latency_s + 0.2 * seconds
        return result, seconds

    async def predict(self, image: np.ndarray, score_threshold: float) -> tuple[Any, float]:
        """Run the model in the worker thread, within the request timeout (504 past it)."""
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self.executor, self._infer, image, score_threshold)
        try:
            return await asyncio.wait_for(future, timeout=self.settings.request_timeout_s)
        except asyncio.TimeoutError:
            raise HTTPError(504, f"the request took longer than the timeout of {self.settings.request_timeout_s} s"
                            ) from None

    def detections_json(self, result: Any, max_detections: int | None, mask_format: str) -> list[dict[str, Any]]:
        """Result -> JSON detections, best first: category id, label, name, score, box XYXY input pixels, mask."""
        from maskrcnn.ops.masks import encode_rle  # noqa: PLC0415

        order = result.scores.argsort(descending=True)
        if max_detections is not None:
            order = order[:max_detections]
        result = result.filter(order)
        names, cats = result.class_names, result.category_ids
        masks = result.masks.cpu().numpy() if result.masks is not None and mask_format != "none" else None
        rles = encode_rle(masks) if masks is not None and mask_format == "rle" else None
        keypoints = result.keypoints.tolist() if result.keypoints is not None else None
        out = []
        for i, (box, score, label) in enumerate(zip(result.boxes.tolist(), result.scores.tolist(),
                                                    result.labels.tolist())):
            det: dict[str, Any] = {"category_id": int(cats[i]), "label": int(label), "name": names[i],
                                   "score": round(float(score), 5), "box": [round(float(v), 2) for v in box]}
            if rles is not None:
                det["mask"] = {"format": "rle", **rles[i]}
            elif masks is not None:
                det["mask"] = {"format": "polygon", "polygons": mask_to_polygons(masks[i])}
            if keypoints is not None:
                det["keypoints"] = [[round(float(x), 2), round(float(y), 2), round(float(v), 4)]
                                    for x, y, v in keypoints[i]]
            out.append(det)
        return out


def _error(exc: HTTPError) -> Any:
    from starlette.responses import JSONResponse  # noqa: PLC0415

    return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)


def _float_param(value: str | None, name: str, lo: float, hi: float) -> float | None:
    if value is None or value == "":
        return None
    try:
        v = float(value)
    except ValueError:
        raise HTTPError(400, f"{name} must be a number, got {value!r}") from None
    if not lo <= v <= hi:
        raise HTTPError(400, f"{name} must be in [{lo}, {hi}], got {v}")
    return v


def create_app(model: Any, name: str, settings: ServeSettings = ServeSettings()) -> Any:
    """The Starlette application serving ``model`` under ``name``."""
    from starlette.applications import Starlette  # noqa: PLC0415
    from starlette.middleware import Middleware  # noqa: PLC0415
    from starlette.requests import Request  # noqa: PLC0415
    from starlette.responses import FileResponse, JSONResponse  # noqa: PLC0415
    from starlette.routing import Route  # noqa: PLC0415

    service = ModelService(model, name, settings)
    open_paths = ("/", "/v2/health/live", "/v2/health/ready", "/favicon.ico")

    def check_key(request: Request) -> None:
        if settings.api_key is None or request.url.path in open_paths:
            return
        given = request.headers.get("x-api-key") or ""
        auth = request.headers.get("authorization") or ""
        if auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        if not hmac.compare_digest(given.encode(), settings.api_key.encode()):
            raise HTTPError(401, "missing or wrong API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'")

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > settings.max_body_bytes:
            raise HTTPError(413, f"body of {declared} bytes is larger than the limit of {settings.max_body_bytes} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():  # counted as it arrives: a chunked body has no Content-Length
            size += len(chunk)
            if size > settings.max_body_bytes:
                raise HTTPError(413, f"body larger than the limit of {settings.max_body_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def image_and_params(request: Request) -> tuple[bytes, dict[str, str]]:
        params = dict(request.query_params)
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            declared = request.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > settings.max_body_bytes:
                raise HTTPError(413, f"body of {declared} bytes is larger than the limit of "
                                     f"{settings.max_body_bytes} bytes")
            try:
                form = await request.form(max_part_size=settings.max_body_bytes)
            except Exception as e:  # noqa: BLE001 - the multipart parser's errors are the client's
                raise HTTPError(400, f"cannot parse the multipart form: {e}") from None
            upload = form.get("image")
            if upload is None or isinstance(upload, str):
                raise HTTPError(400, "the multipart form has no file field 'image'")
            data = await upload.read()
            if len(data) > settings.max_body_bytes:
                raise HTTPError(413, f"image file larger than the limit of {settings.max_body_bytes} bytes")
            for key in ("score_threshold", "max_detections", "mask_format"):
                if isinstance(form.get(key), str):
                    params.setdefault(key, str(form[key]))
            return data, params
        if ctype.startswith("text/") or ctype.startswith("application/json"):
            raise HTTPError(415, f"content type {ctype!r} is not an image; send image bytes or a multipart form")
        return await read_body(request), params

    async def v1_predict(request: Request) -> Any:
        try:
            check_key(request)
            service.admit()
        except HTTPError as e:
            return _error(e)
        try:
            data, params = await image_and_params(request)
            thr = _float_param(params.get("score_threshold"), "score_threshold", 0.0, 1.0)
            max_det = params.get("max_detections")
            if max_det is not None and (not max_det.isdigit() or int(max_det) < 0):
                raise HTTPError(400, f"max_detections must be a non-negative integer, got {max_det!r}")
            mask_format = params.get("mask_format", "rle")
            if mask_format not in MASK_FORMATS:
                raise HTTPError(400, f"mask_format must be one of {', '.join(MASK_FORMATS)}, got {mask_format!r}")
            image = decode_image(data, settings.max_pixels)
            result, seconds = await service.predict(image, settings.score_threshold if thr is None else thr)
            body = {"model": service.name, "image": {"width": int(image.shape[1]), "height": int(image.shape[0])},
                    "detections": service.detections_json(result, None if max_det is None else int(max_det),
                                                          mask_format),
                    "inference_ms": round(seconds * 1000, 1)}
            kh = service.model.cfg.model.keypoint_head
            if kh.enabled:
                body.update(keypoint_names=list(kh.names), skeleton=[list(pair) for pair in kh.skeleton],
                            keypoint_threshold=kh.draw_threshold)
            return JSONResponse(body)
        except HTTPError as e:
            return _error(e)
        finally:
            service.release()

    async def live(request: Request) -> Any:
        return JSONResponse({"live": True})

    async def ready(request: Request) -> Any:
        return JSONResponse({"ready": service.ready}, status_code=200 if service.ready else 503)

    def model_or_404(request: Request) -> None:
        check_key(request)
        if request.path_params["name"] != service.name:
            raise HTTPError(404, f"no model {request.path_params['name']!r}; this service has {service.name!r}")

    async def v2_model(request: Request) -> Any:
        try:
            model_or_404(request)
        except HTTPError as e:
            return _error(e)
        kh = service.model.cfg.model.keypoint_head
        keypoints = [{"name": "keypoints", "datatype": "FP32", "shape": [-1, kh.num_keypoints, 3]}] * kh.enabled
        return JSONResponse({
            "name": service.name, "versions": ["1"], "platform": "maskrcnn",
            "inputs": [{"name": "image", "datatype": "UINT8", "shape": [-1, -1, 3]}],
            "outputs": [{"name": "boxes", "datatype": "FP32", "shape": [-1, 4]},
                        {"name": "scores", "datatype": "FP32", "shape": [-1]},
                        {"name": "labels", "datatype": "INT64", "shape": [-1]}, *keypoints],
            "parameters": {"class_names": list(service.model.cfg.model.class_names)}})

    async def v2_infer(request: Request) -> Any:
        try:
            model_or_404(request)
            service.admit()
        except HTTPError as e:
            return _error(e)
        try:
            raw = await read_body(request)
            try:
                req = json.loads(raw)
                inp = next(i for i in req["inputs"] if i.get("name") == "image")
                shape = [int(v) for v in inp["shape"]]
            except (ValueError, KeyError, TypeError, StopIteration):
                raise HTTPError(400, "expected a v2 inference request: {\"inputs\": [{\"name\": \"image\", "
                                     "\"shape\": [H, W, 3], \"datatype\": \"UINT8\", \"data\": [...]}]}") from None
            if inp.get("datatype") != "UINT8" or len(shape) != 3 or shape[2] != 3:
                raise HTTPError(400, f"input 'image' must be UINT8 of shape [H, W, 3], got {inp.get('datatype')} "
                                     f"{shape}")
            if shape[0] * shape[1] > settings.max_pixels:
                raise HTTPError(413, f"image of {shape[1]}x{shape[0]} pixels is larger than the limit of "
                                     f"{settings.max_pixels} pixels")
            try:
                image = np.asarray(inp["data"], dtype=np.uint8).reshape(shape)
            except (ValueError, TypeError):
                raise HTTPError(400, f"input 'image' data does not hold {shape} uint8 values") from None
            params = req.get("parameters") or {}
            thr = params.get("score_threshold", settings.score_threshold)
            result, _ = await service.predict(image, float(thr))
            outputs = [
                {"name": "boxes", "datatype": "FP32", "shape": [len(result), 4],
                 "data": [round(float(v), 3) for v in result.boxes.reshape(-1).tolist()]},
                {"name": "scores", "datatype": "FP32", "shape": [len(result)],
                 "data": [round(float(v), 6) for v in result.scores.tolist()]},
                {"name": "labels", "datatype": "INT64", "shape": [len(result)], "data": result.labels.tolist()}]
            if result.keypoints is not None:
                outputs.append({"name": "keypoints", "datatype": "FP32", "shape": list(result.keypoints.shape),
                                "data": [round(float(v), 4) for v in result.keypoints.reshape(-1).tolist()]})
            return JSONResponse({"model_name": service.name, "model_version": "1", "id": req.get("id", ""),
                                 "outputs": outputs})
        except HTTPError as e:
            return _error(e)
        finally:
            service.release()

    async def page(request: Request) -> Any:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    async def info(request: Request) -> Any:
        try:
            check_key(request)
        except HTTPError as e:
            return _error(e)
        return JSONResponse({"model": service.name, "class_names": list(service.model.cfg.model.class_names),
                             "score_threshold": settings.score_threshold, "max_body_bytes": settings.max_body_bytes,
                             "max_pixels": settings.max_pixels})

    middleware = []
    if settings.cors_origins:
        from starlette.middleware.cors import CORSMiddleware  # noqa: PLC0415

        middleware.append(Middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                                     allow_methods=["GET", "POST"], allow_headers=["*"]))
    routes = [Route("/", page), Route("/v1/info", info), Route("/v1/predict", v1_predict, methods=["POST"]),
              Route("/v2/health/live", live), Route("/v2/health/ready", ready),
              Route("/v2/models/{name}", v2_model), Route("/v2/models/{name}/infer", v2_infer, methods=["POST"])]

    async def lifespan(app: Any) -> Any:
        yield
        # Shutting down (after uvicorn has drained the requests in flight): not ready any more.
        service.ready = False
        service.executor.shutdown(wait=True)

    from contextlib import asynccontextmanager  # noqa: PLC0415

    app = Starlette(routes=routes, middleware=middleware, lifespan=asynccontextmanager(lifespan))
    app.state.service = service
    return app


def check_bind(host: str, api_key: str | None, allow_unauthenticated: bool) -> None:
    """Refuse a non-local bind without an API key unless the risk was accepted explicitly (ValueError)."""
    if host in LOCAL_HOSTS or api_key or allow_unauthenticated:
        return
    raise ValueError(f"binding to {host} exposes the model to the network: give --api-key KEY, or accept "
                     f"unauthenticated access with --insecure-no-api-key")


def serve(weights: str, host: str = "127.0.0.1", port: int = 8000, settings: ServeSettings = ServeSettings(),
          allow_unauthenticated: bool = False, graceful_timeout_s: float = 30.0, **load_options: Any) -> None:
    """Load ``weights`` (a name, path or .onnx file) and serve it with uvicorn until SIGTERM/SIGINT (then drain)."""
    check_bind(host, settings.api_key, allow_unauthenticated)
    try:
        import uvicorn  # noqa: PLC0415
    except ImportError as e:
        raise ImportError("maskrcnn serve needs the [serve] extra: pip install 'maskrcnn[serve]'") from e
    from maskrcnn.weights import load_model  # noqa: PLC0415

    model = load_model(weights, **load_options)
    name = Path(str(weights).rstrip("/")).stem or "model"
    app = create_app(model, name, settings)
    # uvicorn stops accepting on SIGTERM and waits up to timeout_graceful_shutdown for requests in flight.
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=graceful_timeout_s)
