"""`specinfer serve`: an OpenAI-compatible HTTP server over one engine loop (see app.py, engine_loop.py)."""
