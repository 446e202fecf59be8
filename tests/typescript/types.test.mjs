// types.test.mjs: web/relayhub.d.ts against web/relayhub.js. tsc must accept example.ts (which uses the package
// as installed from ../../web and rejects misuses), and the declarations must list exactly what the JavaScript
// exports, accepts and emits, so an option or method added to one side only fails here. Run with `node --test`.

import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";

import * as client from "relayhub-client";

const here = path.dirname(fileURLToPath(import.meta.url));
const web = path.resolve(here, "../../web");
const dts = fs.readFileSync(path.join(web, "relayhub.d.ts"), "utf8");
const js = fs.readFileSync(path.join(web, "relayhub.js"), "utf8");
const example = fs.readFileSync(path.join(here, "example.ts"), "utf8");

/** The body of the first `{ ... }` after `header` in the declarations. */
function block(header) {
  const start = dts.indexOf(header);
  assert.ok(start >= 0, `relayhub.d.ts has no ${header}`);
  const open = dts.indexOf("{", start);
  let depth = 0;
  for (let i = open; i < dts.length; i++) {
    if (dts[i] === "{") depth++;
    else if (dts[i] === "}" && --depth === 0) return dts.slice(open + 1, i).replace(/\/\*[\s\S]*?\*\//g, "");
  }
  throw new Error(`unclosed ${header}`);
}

/** Member names at the top level of a block (`name?:`, `readonly name:`, `name(`, `name<`). */
function members(body) {
  const names = new Set();
  for (const line of body.split("\n")) {
    const m = /^  (?:readonly )?(\w+)\??(?=[:(<])/.exec(line);
    if (m && m[1] !== "constructor") names.add(m[1]);
  }
  return [...names].sort();
}

const sorted = (xs) => [...xs].sort();

test("tsc --noEmit accepts the example and rejects its misuses", () => {
  const tsc = path.join(here, "node_modules/typescript/bin/tsc");
  const run = spawnSync(process.execPath, [tsc, "-p", here], { encoding: "utf8" });
  assert.equal(run.status, 0, `tsc failed:\n${run.stdout}${run.stderr}`);
});

test("the declared exports are the module's exports", () => {
  const declared = [...dts.matchAll(/^export declare (?:const|function|class) (\w+)/gm)].map((m) => m[1]);
  assert.deepEqual(sorted(declared), sorted(Object.keys(client)));
});

test("every option with a default is declared, in RelayHubOptions and DEFAULTS", () => {
  const options = members(block("export interface RelayHubOptions"));
  const injected = ["WebSocket", "fetch", "EventSource"]; // options without a default
  assert.deepEqual(sorted(options), sorted([...Object.keys(client.DEFAULTS), ...injected]));
  assert.deepEqual(members(block("export declare const DEFAULTS")), sorted(Object.keys(client.DEFAULTS)));
  for (const name of injected) assert.match(js, new RegExp(`this\\.options\\.${name}\\b`), `relayhub.js reads ${name}`);
});

test("every public member of RelayHub is declared", () => {
  const proto = Object.getOwnPropertyNames(client.RelayHub.prototype).filter(
    (n) => n !== "constructor" && !n.startsWith("_"),
  );
  // Public fields set in the constructor (`this.url = ...`).
  const fields = [...js.matchAll(/^ {4}this\.([a-z]\w*) = /gm)].map((m) => m[1]);
  assert.deepEqual(members(block("export declare class RelayHub")), sorted(new Set([...proto, ...fields])));
});

test("every event the client emits is declared", () => {
  const emitted = new Set([...js.matchAll(/_emit\("(\w+)"/g)].map((m) => m[1]));
  assert.deepEqual(members(block("export interface RelayHubEvents")), sorted(emitted));
});

test("the example uses every export, option, member and event", () => {
  const names = [
    ...Object.keys(client),
    ...members(block("export interface RelayHubOptions")),
    ...members(block("export declare class RelayHub")),
    ...members(block("export interface RelayHubEvents")),
  ];
  const body = example.slice(0, example.indexOf("// --- misuses"));
  for (const name of names) assert.match(body, new RegExp(`\\b${name}\\b`), `example.ts does not use ${name}`);
});
