// No server: the generated types match specs/openapi.json, HTTP answers map to the error tree,
// values round-trip.
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { readFileSync } from "node:fs";
import { test } from "node:test";

import { generate, OUTPUT, SPEC } from "../scripts/gen-types.mjs";
import {
  Aborted, Conflict, DataDirLocked, errorFromResponse, HistoryTruncated, InvalidRequest, LimitExceeded,
  OPENAPI_SHA256, OribusError, SessionExpired, Unavailable, ValueTooLarge, WatchLagged,
} from "../dist/index.js";
import { fromWire, toWire } from "../dist/values.js";

test("src/openapi.ts is what specs/openapi.json gives (run `npm run generate` after changing the spec)", () => {
  assert.equal(readFileSync(OUTPUT, "utf8"), generate());
});

test("the built package was generated from the current spec", () => {
  assert.equal(OPENAPI_SHA256, createHash("sha256").update(readFileSync(SPEC)).digest("hex"));
});

test("every error code of the spec maps to a class of the tree", () => {
  const codes = JSON.parse(readFileSync(SPEC, "utf8")).components.schemas.Error.properties.code.enum;
  for (const code of codes) {
    const e = errorFromResponse(400, { error: code, code, message: "m" });
    assert.ok(e instanceof OribusError, code);
    assert.equal(e.code, code);
  }
});

test("HTTP error answers become the typed errors", () => {
  const conflict = errorFromResponse(409, {
    error: "Conflict", code: "Conflict", message: "commit refused", details: {},
    stale: [["b", 3, 4, "stale_read"], ["c", null, 1, "expected_version"]],
  });
  assert.ok(conflict instanceof Conflict);
  assert.equal(conflict.retryable, true);
  assert.equal(conflict.status, 409);
  assert.deepEqual(conflict.stale, [
    { key: "b", version: 3, current: 4, reason: "stale_read" },
    { key: "c", version: null, current: 1, reason: "expected_version" },
  ]);
  assert.ok(errorFromResponse(409, { code: "Aborted", message: "" }) instanceof Conflict);
  assert.ok(errorFromResponse(409, { code: "Aborted", message: "" }) instanceof Aborted);
  assert.ok(errorFromResponse(410, { code: "SessionExpired", message: "" }) instanceof SessionExpired);
  assert.ok(errorFromResponse(413, { code: "ValueTooLarge", message: "" }) instanceof InvalidRequest);
  assert.ok(errorFromResponse(413, { code: "BodyTooLarge", message: "" }) instanceof ValueTooLarge);
  assert.ok(errorFromResponse(410, { code: "HistoryTruncated", message: "" }) instanceof HistoryTruncated);
  assert.ok(errorFromResponse(429, { code: "LimitExceeded", message: "" }) instanceof LimitExceeded);
  assert.ok(errorFromResponse(503, { code: "WatchLagged", message: "" }) instanceof Unavailable);
  assert.ok(errorFromResponse(503, { code: "DataDirLocked", message: "" }) instanceof DataDirLocked);
  const unavailable = errorFromResponse(503, { code: "Unavailable", message: "shard 1 down" });
  assert.ok(unavailable instanceof Unavailable && !(unavailable instanceof WatchLagged));
  assert.equal(unavailable.retryable, true);
  assert.equal(unavailable.message, "shard 1 down");
  // codes of the gateway itself, and answers that are not the bus's: by status
  const media = errorFromResponse(415, { error: "UnsupportedMediaType", code: "UnsupportedMediaType", message: "x" });
  assert.ok(media instanceof InvalidRequest);
  assert.equal(media.code, "UnsupportedMediaType");
  assert.ok(errorFromResponse(502, "Bad Gateway") instanceof Unavailable);
  assert.ok(errorFromResponse(408, { code: "RequestTimeout" }) instanceof Unavailable);
  const internal = errorFromResponse(500, { code: "Internal", message: "boom" });
  assert.equal(internal.constructor, OribusError);
  assert.equal(internal.retryable, false);
});

test("values: bytes travel as {$bytes}, what JSON cannot carry is refused", () => {
  const v = { a: [1, "x", null, true], b: new Uint8Array([0, 255, 7]) };
  const wire = toWire(v);
  assert.deepEqual(wire, { a: [1, "x", null, true], b: { $bytes: "AP8H" } });
  assert.deepEqual(fromWire(JSON.parse(JSON.stringify(wire))), v);
  for (const bad of [undefined, NaN, Infinity, () => 1, new Date(0), new Map(), 10n]) {
    assert.throws(() => toWire(bad), InvalidRequest);
  }
  assert.throws(() => toWire({ deep: [1, undefined] }), /value.deep\[1\] is undefined/);
});

test("the agent's token goes with every request as a bearer credential, from the option or $ORIBUS_TOKEN", async () => {
  const { connect } = await import("../dist/index.js");
  const seen = [];
  const fakeFetch = async (url, init) => {
    seen.push(init.headers.authorization);
    return new Response(JSON.stringify({ agent: "a", session: "s", session_token: "st" }),
                        { status: 200, headers: { "content-type": "application/json" } });
  };
  await connect("http://127.0.0.1:1", { agent: "a", token: "given", fetch: fakeFetch });
  process.env.ORIBUS_TOKEN = "from-env";
  try {
    await connect("http://127.0.0.1:1", { agent: "a", fetch: fakeFetch });
  } finally {
    delete process.env.ORIBUS_TOKEN;
  }
  await connect("http://127.0.0.1:1", { agent: "a", fetch: fakeFetch });
  assert.deepEqual(seen, ["Bearer given", "Bearer from-env", undefined]);
});
