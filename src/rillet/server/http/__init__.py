"""The HTTP door: TGI's routes, OpenAI's (``/v1``), plain text, Triton's HTTP ``generate``
and KServe v2 health/metadata (``/v2``), resumable streams (``/streams/<sid>``) and the
page, over Server-Sent Events, chunked text and JSON; the WebSockets mount on the same app."""
