"""Who may use `eqakit webui`, and where it may write: real servers, real HTTP, only to 127.0.0.1.

The probes are the issue's: a Gradio endpoint called directly (``POST /gradio_api/call/save_config``
with a path anywhere), a Host header naming another site (DNS rebinding), and a page bound beyond
loopback. Two servers: one on 127.0.0.1 without a key, one on 0.0.0.0 with ``API_KEY`` (reached
through 127.0.0.1 like any other address of this machine).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from conftest import write_toy_dataset
from eqakit.errors import EqakitError
from eqakit.serve.webui_access import access_key
from eqakit.serve.webui_train import FORM
from test_webui import CHROMIUM, CHROMIUM_ARGS, free_port, train_yaml, webui_server

pytestmark = pytest.mark.slow


class Client(requests.Session):
    """A requests session whose requests never wait for ever."""

    def request(self, *args: Any, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", 30)
        return super().request(*args, **kwargs)


def call(url: str, api_name: str, data: list, session: requests.Session | None = None) -> list:
    """A Gradio endpoint called as a script would: POST the inputs, then read the event stream to its
    end; the outputs (what the page would show)."""
    http = session or Client()
    posted = http.post(f"{url}gradio_api/call/{api_name}", json={"data": data}, timeout=30)
    assert posted.status_code == 200, posted.text
    stream = http.get(f"{url}gradio_api/call/{api_name}/{posted.json()['event_id']}", timeout=300)
    kind, payload = re.findall(r"event: (\w+)\ndata: (.*)", stream.text)[-1]
    assert kind == "complete", stream.text
    return json.loads(payload)


def listening(port: int) -> set[str]:
    """The addresses a TCP socket of this machine listens on at ``port`` (from /proc/net/tcp{,6})."""
    found = set()
    for table in (Path("/proc/net/tcp"), Path("/proc/net/tcp6")):
        for line in table.read_text().splitlines()[1:] if table.exists() else []:
            fields = line.split()
            address, _, hex_port = fields[1].partition(":")
            if fields[3] == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(address)  # 32-bit words, each in host (little-endian) order
                words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                found.add(str(ipaddress.ip_address(words)))
    return found


def port_of(url: str) -> int:
    return int(url.rstrip("/").rsplit(":", 1)[1])


@pytest.fixture(scope="module")
def local(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """`eqakit webui configs/train.yaml --allow-dir extra --allowed-host webui.lan`, started in ``work``:
    its write roots are work, configs and extra; ``outside`` is none of them."""
    root = tmp_path_factory.mktemp("access")
    dirs = {name: root / name for name in ("work", "configs", "extra", "outside")}
    for path in dirs.values():
        path.mkdir()
    data = write_toy_dataset(root / "data", episodes=1, questions=2)
    config = train_yaml(dirs["configs"] / "train.yaml", tiny_model_dir, data, dirs["work"] / "run")
    log = root / "server.log"
    args = [str(config), "--allow-dir", str(dirs["extra"]), "--allowed-host", "webui.lan"]
    with webui_server(args, log, cwd=dirs["work"]) as url:
        yield {"url": url, "log": log, "config": config, "data": data, "model": tiny_model_dir, **dirs}


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """`API_KEY=K eqakit webui --host 0.0.0.0`, started in ``work``."""
    root = tmp_path_factory.mktemp("guarded")
    work = root / "work"
    work.mkdir()
    key = secrets.token_urlsafe(24)
    log = root / "server.log"
    with webui_server(["--host", "0.0.0.0"], log, env={"API_KEY": key}, cwd=work) as url:
        yield {"url": url, "log": log, "key": key, "work": work}


def test_binds_loopback_by_default_and_answers_only_the_hosts_it_serves(local: dict) -> None:
    """Bound to 127.0.0.1 alone; a Host naming loopback, localhost or --allowed-host is served, any
    other name (a rebound DNS name) is refused with one plain line before Gradio sees the request,
    so the hostile call writes nothing; without a key the page needs no login, as before."""
    url, port = local["url"], port_of(local["url"])
    assert listening(port) == {"127.0.0.1"}
    assert f"Running on local URL:  http://127.0.0.1:{port}" in local["log"].read_text()
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "127.0.0.2", "WebUI.lan."):
        assert requests.get(url, headers={"Host": host}, timeout=10).status_code == 200, host
    assert requests.get(f"{url}config", timeout=10).status_code == 200  # no login on loopback

    for host, name in (
        (f"evil.example:{port}", "evil.example"),
        ("127.0.0.1.evil.example", "127.0.0.1.evil.example"),
        (f"192.0.2.7:{port}", "192.0.2.7"),  # another machine's address: not this loopback server's
        (f"0.0.0.0:{port}", "0.0.0.0"),
    ):
        refused = requests.get(url, headers={"Host": host}, timeout=10)
        assert refused.status_code == 400 and refused.headers["content-type"].startswith("text/plain")
        assert refused.text.strip().splitlines() == [
            f"eqakit webui: Host {name} is not served here; start eqakit webui with --allowed-host {name} to serve it"
        ]
    target = local["work"] / "rebound.yaml"
    probe = requests.post(
        f"{url}gradio_api/call/save_config",
        json={"data": [str(target), "hi"]},
        headers={"Host": f"evil.example:{port}"},
        timeout=10,
    )
    assert probe.status_code == 400 and not target.exists()


def test_save_config_writes_only_inside_the_directories_the_page_was_started_with(local: dict) -> None:
    """The issue's probe, `save_config` with a path anywhere: refused outside the working dir, the
    config's dir and --allow-dir, after resolving .. and symlinks, with a line naming the path and
    the allowed dirs; inside them it saves as before (a relative path: under the working dir)."""
    url, work, outside = local["url"], local["work"], local["outside"]
    (work / "link").symlink_to(outside)
    for path in (outside / "pwned.txt", work / ".." / "outside" / "up.yaml", work / "link" / "via-link.yaml"):
        [shown] = call(url, "save_config", [str(path), "hi"])
        assert shown.startswith("**Error:** config path ") and str(path) in shown, shown
        assert "outside the directories this page may write to" in shown and "--allow-dir" in shown, shown
        for root in ("work", "configs", "extra"):
            assert str(local[root]) in shown
    assert "(that is " + str(outside / "via-link.yaml") + ")" in shown  # the resolved path is named
    assert list(outside.iterdir()) == []

    for path, written in (
        (str(work / "a.yaml"), work / "a.yaml"),
        (str(local["configs"] / "b.yaml"), local["configs"] / "b.yaml"),
        (str(local["extra"] / "new" / "c.yaml"), local["extra"] / "new" / "c.yaml"),
        ("d.yaml", work / "d.yaml"),
    ):
        [shown] = call(url, "save_config", [path, "lr: 1\n"])
        assert shown.startswith("Saved "), shown
        assert written.read_text() == "lr: 1\n"


def test_train_evaluate_and_export_take_paths_only_inside_those_directories(local: dict) -> None:
    """Start and Resume refuse an output_dir or a config file outside; Evaluate an output dir, Export
    an export dir; nothing is created there. Inside, the run goes on to the config checks."""
    url, outside, config_file = local["url"], local["outside"], str(local["config"])

    def form(**keys: object) -> list:
        """The Train form's fields (an empty number: that key's default)."""
        return [keys.get(key) for key, _, _ in FORM]

    paths = {"model_name_or_path": str(local["model"]), "dataset_dir": str(local["data"]), "dataset": "toy"}
    for api_name, first in (("train_start", []), ("train_resume", [None])):  # Resume: the checkpoint
        fields = [*first, config_file, *form(**paths, output_dir=str(outside / "run"))]
        notice, _ = call(url, api_name, fields)
        assert f"output_dir {outside / 'run'} is outside" in notice, notice
    inside = form(**paths, output_dir=str(local["work"] / "run"), learning_rate=-1.0)
    notice, _ = call(url, "train_start", [str(outside / "train.yaml"), *inside])
    assert f"config file {outside / 'train.yaml'} is outside" in notice, notice
    notice, _ = call(url, "train_start", [config_file, *inside])
    assert "invalid configuration" in notice and "learning_rate" in notice, notice

    evaluate = [
        str(local["model"]),
        "",
        "qwen3_vl_nothink",
        str(local["data"]),
        "toy",
        str(outside / "predict"),
    ]
    status, *_ = call(url, "evaluate", [*evaluate, 2, 8, 0.0, 1.0, False])
    assert f"output_dir {outside / 'predict'} is outside" in status, status
    status, *_ = call(
        url, "export", [str(local["model"]), "", "qwen3_vl_nothink", str(outside / "merged"), 1, False]
    )
    assert f"export_dir {outside / 'merged'} is outside" in status, status
    assert list(outside.iterdir()) == []


def test_beyond_loopback_without_an_access_key_it_refuses_to_start(tmp_path: Path) -> None:
    """--host 0.0.0.0 with no API_KEY (or an empty --access-key-file): one line saying how to set a
    key, a failing exit status, and no port opened."""
    env = {k: v for k, v in os.environ.items() if k != "API_KEY"}
    empty = tmp_path / "key.txt"
    empty.write_text("\n")
    for extra, says in (([], "set an access key first"), (["--access-key-file", str(empty)], "is empty")):
        port = free_port()
        done = subprocess.run(
            [sys.executable, "-m", "eqakit", "webui", "--host", "0.0.0.0", "--port", str(port), *extra],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert done.returncode != 0
        [line] = done.stderr.strip().splitlines()
        assert line.startswith("eqakit webui: ") and says in line, done.stderr
        if not extra:
            assert "API_KEY" in line and "--access-key-file" in line, line
        assert listening(port) == set()


def test_access_key_from_a_file_or_api_key(tmp_path: Path) -> None:
    """--access-key-file's first line wins over API_KEY; an unreadable or empty file is refused."""
    key_file = tmp_path / "key.txt"
    key_file.write_text("  from-the-file \n")
    assert access_key(str(key_file), {"API_KEY": "from-env"}) == "from-the-file"
    assert access_key(None, {"API_KEY": "from-env"}) == "from-env"
    assert access_key(None, {"API_KEY": ""}) is None
    with pytest.raises(EqakitError, match="cannot read it"):
        access_key(str(tmp_path / "missing.txt"), {})


def test_beyond_loopback_it_warns_and_every_route_needs_the_access_key(guarded: dict) -> None:
    """On 0.0.0.0 with API_KEY: a warning at start; without a login every Gradio route that runs,
    reads, uploads or streams is refused (and the hostile call writes nothing); a wrong key is
    refused; the key (any user name) opens them all. Any address is a Host (it cannot be rebound);
    a name still must be served."""
    url, port, work = guarded["url"], port_of(guarded["url"]), guarded["work"]
    assert listening(port) == {"0.0.0.0"}
    log = guarded["log"].read_text()
    assert (
        f"eqakit webui: warning: listening on 0.0.0.0:{port}: anyone who can reach it and holds the "
        "access key can run models, train and write files in " + str(work.resolve())
    ) in log

    target = work / "pwned.yaml"
    (work / "seen.txt").write_text("a file of the working dir")
    anonymous = Client()
    refused = {
        "call": anonymous.post(f"{url}gradio_api/call/save_config", json={"data": [str(target), "hi"]}),
        "call result": anonymous.get(f"{url}gradio_api/call/save_config/0123"),
        "queue join": anonymous.post(
            f"{url}gradio_api/queue/join",
            json={"data": [str(target), "hi"], "fn_index": 0, "session_hash": "s"},
        ),
        "queue data": anonymous.get(f"{url}gradio_api/queue/data", params={"session_hash": "s"}),
        "upload": anonymous.post(f"{url}gradio_api/upload", files={"files": ("a.txt", b"hi")}),
        "file": anonymous.get(f"{url}gradio_api/file={work / 'seen.txt'}"),
        "config": anonymous.get(f"{url}config"),
        "info": anonymous.get(f"{url}gradio_api/info"),
        "heartbeat": anonymous.get(f"{url}gradio_api/heartbeat/s"),
        "run history": anonymous.get(f"{url}gradio_api/run-history/buckets"),
        "cancel": anonymous.post(
            f"{url}gradio_api/cancel", json={"session_hash": "s", "fn_index": 0, "event_id": "e"}
        ),
    }
    assert {name: r.status_code for name, r in refused.items()} == dict.fromkeys(refused, 401)
    assert not target.exists()
    assert anonymous.get(url).status_code == 200  # the login page

    wrong = anonymous.post(f"{url}login", data={"username": "me", "password": guarded["key"] + "x"})
    assert wrong.status_code == 400 and anonymous.get(f"{url}config").status_code == 401
    user = Client()
    assert (
        user.post(f"{url}login", data={"username": "anyone", "password": guarded["key"]}).status_code == 200
    )
    assert user.get(f"{url}config").status_code == 200
    assert user.post(f"{url}gradio_api/upload", files={"files": ("a.txt", b"hi")}).status_code == 200
    [shown] = call(url, "save_config", [str(work / "mine.yaml"), "lr: 1\n"], user)
    assert shown.startswith("Saved ") and (work / "mine.yaml").read_text() == "lr: 1\n"

    assert anonymous.get(url, headers={"Host": f"192.0.2.7:{port}"}).status_code == 200
    assert anonymous.get(url, headers={"Host": f"evil.example:{port}"}).status_code == 400


@pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is absent (apt-get install chromium)")
def test_a_browser_logs_in_with_the_access_key(guarded: dict) -> None:
    """The login page works with the gate in front of /gradio_api: the key opens the whole page."""
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.set_default_timeout(60_000)
        page.goto(guarded["url"])
        page.locator("input[type=password]").fill(guarded["key"])
        page.locator("input[type=text]").first.fill("me")
        page.get_by_role("button", name="Login").click()
        page.wait_for_selector("#chat-input textarea")
        assert "no model" in page.locator("#model-status").inner_text().lower()
        browser.close()
