#!/usr/bin/env bash
# The tutorial's curl call (step 3.6) against `eqakit api`:
#   API_PORT=8000 eqakit api configs/infer_openeqa.yaml
#   examples/curl_chat.sh path/to/frame.jpg [http://localhost:8000]
#
# One change from the tutorial: the tutorial was written on macOS, whose `base64 -i FILE` prints one
# line; GNU base64 (Linux) wraps at 76 columns and the shell then splits the unquoted ${IMAGE_B64}
# into several arguments. `base64 < FILE | tr -d '\n'` prints one line on both.
# With API_KEY set on the server, export API_KEY here too.
set -euo pipefail

IMAGE_PATH=${1:?usage: curl_chat.sh IMAGE [BASE_URL]}
BASE_URL=${2:-http://localhost:8000}
IMAGE_B64=$(base64 < "$IMAGE_PATH" | tr -d '\n')

curl -sS -X POST "$BASE_URL/v1/chat/completions" \
  -H "Content-Type: application/json" \
  ${API_KEY:+-H "Authorization: Bearer $API_KEY"} \
  -d '{
    "model": "Qwen3-VL",
    "messages": [{
      "role": "user",
      "content": [
        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,'${IMAGE_B64}'"}},
        {"type": "text", "text": "这张图片里有什么?"}
      ]
    }],
    "temperature": 0.2,
    "max_tokens": 128
  }'
echo
