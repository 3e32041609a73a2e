"""HTTP-level fakes of provider batch APIs, built from shared/reference/provider-batch-apis.md.

Each fake is an ASGI app that speaks its provider's wire format; `serve_app` runs one on
uvicorn on 127.0.0.1 in a background thread, so the adapters (and the official SDKs under
them) talk to it over real HTTP exactly as they would to the provider.
"""
