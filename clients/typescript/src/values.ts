/**
 * Values between JavaScript and the bus's JSON (`oribus/gateway/values.py`): bytes travel as
 * `{"$bytes": base64}` both ways, a `Uint8Array` here; everything else is JSON as it is.
 */
import { InvalidRequest } from "./errors.js";

/** What a key can hold: JSON, with bytes as `Uint8Array`. */
export type Value = null | boolean | number | string | Uint8Array | Value[] | { [key: string]: Value };

function toBase64(bytes: Uint8Array): string {
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    s += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  }
  return btoa(s);
}

function fromBase64(text: string): Uint8Array {
  const s = atob(text);
  const out = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
  return out;
}

/** A value as the bus's JSON; InvalidRequest for what JSON cannot carry (undefined, functions, NaN...). */
export function toWire(value: unknown, path = "value"): unknown {
  if (value === null || typeof value === "string" || typeof value === "boolean") return value;
  if (typeof value === "number") {
    if (!Number.isFinite(value)) throw new InvalidRequest(`${path} is ${value}, which JSON cannot carry`);
    return value;
  }
  if (value instanceof Uint8Array) return { $bytes: toBase64(value) };
  if (Array.isArray(value)) return value.map((v, i) => toWire(v, `${path}[${i}]`));
  if (typeof value === "object") {
    const proto = Object.getPrototypeOf(value);
    if (proto !== Object.prototype && proto !== null) {
      throw new InvalidRequest(`${path} is a ${proto?.constructor?.name ?? "object"}: values are JSON (plain objects, arrays...) or Uint8Array`);
    }
    const out: Record<string, unknown> = {};
    for (const [k, v] of Object.entries(value)) out[k] = toWire(v, `${path}.${k}`);
    return out;
  }
  throw new InvalidRequest(`${path} is ${typeof value === "undefined" ? "undefined" : `a ${typeof value}`}: values are JSON or Uint8Array`);
}

/** A value from the bus's JSON (`{"$bytes": ...}` becomes a Uint8Array). */
export function fromWire(value: unknown): Value {
  if (Array.isArray(value)) return value.map(fromWire);
  if (value !== null && typeof value === "object") {
    const entries = Object.entries(value);
    if (entries.length === 1 && entries[0]![0] === "$bytes" && typeof entries[0]![1] === "string") {
      return fromBase64(entries[0]![1]);
    }
    const out: Record<string, Value> = {};
    for (const [k, v] of entries) out[k] = fromWire(v);
    return out;
  }
  return value as Value;
}
