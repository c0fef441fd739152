"""The HTTP adapter: FastAPI app factory, routers, and the one error → HTTP problem mapping."""
