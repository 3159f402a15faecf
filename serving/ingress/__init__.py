"""Front doors: the OpenAI-compatible HTTP app and the gRPC servicer (thin: parse, validate, call, map errors)."""
