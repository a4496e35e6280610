"""Stream a reply token by token from a running `rillet serve`, over gRPC (port 8001).

The same shape as NuPIC's streaming example: a callback that prints each piece of text as
it is generated, and a StreamingClient on the Triton-style gRPC port. The model's name is
the served one with the ".streaming" suffix, as NuPIC names streaming models.

    python streaming.py "Tell me a story about a lighthouse." --max-tokens 200
"""

from __future__ import annotations

import argparse
import json
import urllib.request

from rillet.client import StreamingClient


def callback(text: str) -> None:
    print(text, end="", flush=True)


def served_model(http_url: str) -> str:
    with urllib.request.urlopen(f"{http_url}/info", timeout=10) as response:
        return str(json.load(response)["model_id"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompt", nargs="?", default="Write a short poem about a river.")
    parser.add_argument("--url", default="localhost:8001", help="the server's gRPC address")
    parser.add_argument("--http", default="http://127.0.0.1:8080", help="to look up the model")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--api-key", default=None)
    args = parser.parse_args()

    model_name = served_model(args.http) + ".streaming"
    # Create the streaming client
    client = StreamingClient(model_name, url=args.url, api_key=args.api_key)
    # Generate a streaming response: the server applies the model's chat template
    client.generate(
        messages=[{"role": "user", "content": args.prompt}],
        callback=callback,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
    )
    print()
    client.close()


if __name__ == "__main__":
    main()
