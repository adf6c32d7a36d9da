// Calls POST /v1/images/edits through the official `openai` Node SDK, once per job call, with
// the params object built in the key order the call gives (the SDK writes multipart fields in
// that order). Reads one JSON job on stdin:
//
//   {"base_url": "http://127.0.0.1:PORT/v1", "api_key": "...", "concurrency": 8,
//    "calls": [{"id": "...", "upload": "tofile" | "stream", "headers": {...},
//               "api_key": <optional, instead of the job's>,
//               "params": [["model", "gpt-image-1"], ["image", {"file": PATH, "name": "a.png",
//                          "type": "image/png"}], ["n", 2], ["stream", true], ...]}]}
//
// An image value is a file spec or a list of them; "tofile" uploads each as toFile(bytes, name,
// {type}), "stream" as fs.createReadStream(PATH). Prints one JSON line per call, in job order:
//
//   {"id", "ok", "status", "error": {"message", "code", "param", "type"} | null,
//    "images": <data.length, or completed events>, "events": [<SSE event types>],
//    "wire": [<multipart part names in the order the SDK put them on the wire>],
//    "sdk": <the openai package's version>, "node": <node's version>}
//
// Exits 0 when every call ran (whatever the gateway answered); non-zero only when the harness
// itself broke.
import fs from "node:fs";

import OpenAI, { toFile } from "openai";

const PART_NAME = /^Content-Disposition: form-data; name="([^"]*)"/gm;

async function readAll(stream) {
  const chunks = [];
  for await (const chunk of stream) chunks.push(Buffer.from(chunk));
  return Buffer.concat(chunks);
}

// A fetch that hands the request to the real fetch untouched and notes, on the side, the names
// of the multipart parts in wire order: FormData keeps its append order, a streamed body is teed.
function observingFetch(seen) {
  return async (url, init) => {
    if (init?.body instanceof FormData) {
      seen.wire = [...init.body.keys()];
    } else if (init?.body instanceof ReadableStream) {
      const [toSend, toRead] = init.body.tee();
      init = { ...init, body: toSend };
      seen.wireDone = readAll(toRead).then((bytes) => {
        seen.wire = [...bytes.toString("latin1").matchAll(PART_NAME)].map((m) => m[1]);
      });
    }
    return fetch(url, init);
  };
}

async function upload(spec, mode) {
  if (mode === "stream") return fs.createReadStream(spec.file);
  return toFile(fs.readFileSync(spec.file), spec.name, { type: spec.type });
}

async function buildParams(call) {
  const params = {};
  for (const [key, value] of call.params) {
    if (Array.isArray(value)) {
      params[key] = await Promise.all(value.map((spec) => upload(spec, call.upload)));
    } else if (value !== null && typeof value === "object" && "file" in value) {
      params[key] = await upload(value, call.upload);
    } else {
      params[key] = value;
    }
  }
  return params;
}

async function runCall(job, call) {
  const seen = { wire: null, wireDone: null };
  const client = new OpenAI({
    baseURL: job.base_url, apiKey: call.api_key ?? job.api_key, maxRetries: 0, timeout: 60_000,
    fetch: observingFetch(seen),
  });
  const result = { id: call.id, ok: false, status: null, error: null, images: 0, events: [],
                   wire: null };
  try {
    const params = await buildParams(call);
    const answer = await client.images.edit(params, { headers: call.headers ?? {} });
    if (params.stream === true) {
      for await (const event of answer) {
        result.events.push(event.type);
        if (event.type === "image_edit.completed") result.images += 1;
      }
    } else {
      result.images = answer.data.length;
    }
    result.ok = true;
    result.status = 200;
  } catch (err) {
    if (!(err instanceof OpenAI.APIError)) {
      result.error = { message: String(err?.stack ?? err), code: "harness_error", param: null,
                       type: err?.constructor?.name ?? null };
    } else {
      result.status = err.status ?? null;
      result.error = { message: err.message, code: err.code ?? null, param: err.param ?? null,
                       type: err.type ?? null };
    }
  }
  if (seen.wireDone) await seen.wireDone.catch(() => {});
  result.wire = seen.wire;
  return result;
}

async function main() {
  const job = JSON.parse(await readAll(process.stdin));
  const results = new Array(job.calls.length);
  let next = 0;
  async function worker() {
    while (next < job.calls.length) {
      const i = next++;
      results[i] = await runCall(job, job.calls[i]);
    }
  }
  await Promise.all(Array.from({ length: job.concurrency ?? 8 }, worker));
  const sdk = JSON.parse(fs.readFileSync(
    new URL("./node_modules/openai/package.json", import.meta.url))).version;
  for (const result of results) {
    process.stdout.write(JSON.stringify({ ...result, sdk, node: process.versions.node }) + "\n");
  }
}

await main();
