"""The HTTP service: ``create_app`` (Starlette) and ``serve`` (uvicorn); see :mod:`maskrcnn.serve.app`."""

from maskrcnn.serve.app import ServeSettings, check_bind, create_app, decode_image, serve

__all__ = ["ServeSettings", "check_bind", "create_app", "decode_image", "serve"]
