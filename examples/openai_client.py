"""Call `eqakit api` with the official openai SDK: a whole answer, then the same question streamed.

    API_PORT=8000 eqakit api configs/infer_openeqa.yaml
    python examples/openai_client.py data/open_eqa_frames/<episode>/000.jpg data/open_eqa_frames/<episode>/004.jpg \
        --question "What color is the sofa?" [--base-url http://localhost:8000/v1]

The API key is read from API_KEY (any value when the server has none). Several images are sent in one
message, in order, as OpenEQA's frames are.
"""

import argparse
import base64
import mimetypes
import os

from openai import OpenAI


def data_uri(path: str) -> str:
    mime = mimetypes.guess_type(path)[0] or "image/jpeg"
    with open(path, "rb") as f:
        return f"data:{mime};base64,{base64.b64encode(f.read()).decode()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+", help="image files (e.g. an episode's frames)")
    parser.add_argument("--question", default="What is in front of the robot?")
    parser.add_argument("--base-url", default="http://localhost:8000/v1")
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()

    client = OpenAI(base_url=args.base_url, api_key=os.environ.get("API_KEY") or "none")
    content = [{"type": "image_url", "image_url": {"url": data_uri(p)}} for p in args.images]
    content.append({"type": "text", "text": args.question})
    messages = [{"role": "user", "content": content}]

    reply = client.chat.completions.create(
        model="any", messages=messages, temperature=0, max_tokens=args.max_tokens
    )
    print(f"[{reply.model}] {reply.choices[0].message.content}")
    print(f"usage: {reply.usage.prompt_tokens} prompt + {reply.usage.completion_tokens} completion tokens")

    stream = client.chat.completions.create(
        model="any",
        messages=messages,
        temperature=0,
        max_tokens=args.max_tokens,
        stream=True,
        stream_options={"include_usage": True},
    )
    print("streamed: ", end="", flush=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
        if chunk.usage is not None:
            print(f"\nusage: {chunk.usage.total_tokens} tokens")


if __name__ == "__main__":
    main()
