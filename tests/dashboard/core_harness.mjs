// Runs calls against the dashboard's core.js for tests/dashboard/test_assets.py.
// Usage: node core_harness.mjs <path of core.js>, with a JSON request on stdin:
//   {"calls": [{"fn": name, "args": [...]}
//              | {"get": exportName}
//              | {"new": className, "args": [...], "ops": [[method, ...args], ...],
//                 "props": [name, ...]}]}
// Prints {"results": [...]}, one entry per call; URL objects are given as their href.
// A call that throws yields {"error": message} instead of stopping the run.

import { readFileSync } from "node:fs";
import { pathToFileURL } from "node:url";

const core = await import(pathToFileURL(process.argv[2]).href);
const request = JSON.parse(readFileSync(0, "utf8"));

function plain(value) {
  return value instanceof URL ? value.href : value;
}

function run(call) {
  if ("get" in call) return core[call.get];
  if ("fn" in call) return plain(core[call.fn](...call.args));
  const instance = new core[call.new](...call.args);
  const results = call.ops.map(([method, ...args]) => plain(instance[method](...args)));
  const props = Object.fromEntries(call.props.map((name) => [name, instance[name]]));
  return { results, props };
}

const results = request.calls.map((call) => {
  try {
    return run(call);
  } catch (error) {
    return { error: String(error) };
  }
});
process.stdout.write(JSON.stringify({ results }));
