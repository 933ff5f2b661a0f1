"""Ferry's Python client for the binary ZeroMQ frontend."""
from frontends.client.client import AsyncFerryClient, ClientRegion, FerryClient

__all__ = ["AsyncFerryClient", "ClientRegion", "FerryClient"]
