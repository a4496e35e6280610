"""The HTTP door: TGI, OpenAI and plain-text routes over Server-Sent Events and chunked text."""
