"""The tutorial's Python client (step 3.6), unchanged apart from where the URL and image come from.

    API_PORT=8000 eqakit api configs/infer_openeqa.yaml
    IMAGE_PATH=data/open_eqa_frames/<episode>/000.jpg python examples/requests_client.py

API_URL defaults to http://localhost:8000/v1/chat/completions. With API_KEY set on the server, set it
here too (the tutorial's server had none).
"""

import base64
import os

import requests

# 配置 (configuration)
API_URL = os.environ.get("API_URL", "http://localhost:8000/v1/chat/completions")
IMAGE_PATH = os.environ.get("IMAGE_PATH", "data/open_eqa_frames/0dbc7b51e8042ff1/000.jpg")  # 你的本地图像路径
HEADERS = {"Authorization": f"Bearer {os.environ['API_KEY']}"} if os.environ.get("API_KEY") else None


# 1. 将本地图像转为 Base64 (encode the local image as base64)
def encode_image(image_path):
    with open(image_path, "rb") as image_file:
        return base64.b64encode(image_file.read()).decode("utf-8")


image_base64 = encode_image(IMAGE_PATH)

# 2. 构造多模态消息(OpenAI 兼容格式) (a multimodal message in OpenAI's format)
payload = {
    "model": "Qwen3-VL-2B-Instruct",  # 可任意填写 (any name works; the server answers with its own)
    "messages": [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{image_base64}"}},
                {"type": "text", "text": "你是具身智能机器人,应该向左转还是向右转才能拿到吉他?"},
            ],
        }
    ],
    "temperature": 0.2,
    "max_tokens": 128,
    "top_p": 1.0,
}

# 3. 发送请求 (send the request)
response = requests.post(API_URL, json=payload, headers=HEADERS)
result = response.json()

# 4. 提取回答 (read the answer)
if "choices" in result:
    answer = result["choices"][0]["message"]["content"]
    print(f"模型回答:{answer}")
else:
    print(f"错误:{result}")
