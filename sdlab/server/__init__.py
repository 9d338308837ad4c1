"""The HTTP server: AUTOMATIC1111's and ComfyUI's APIs over one persistent job queue (`sdlab serve`)."""

from sdlab.server.cli import add_serve_parser

__all__ = ["add_serve_parser"]
