"""Request guards that run before a view: rate limit, body size, API keys, CORS, client timeouts."""
