// Validates Kubernetes objects against the API's OpenAPI schemas with the
// npm package kubernetes-models, and also rejects fields the schema does not
// know (a misspelt `readinesProbe` passes the schemas alone, as they allow
// extra properties; `kubectl apply` rejects it).
//
// Usage: node validate.js NODE_MODULES_DIR < docs.json
// where docs.json is a JSON array of {"name": "...", "doc": {...}}. Prints
// one line per problem, "name: message", and exits 1 if there is any.
"use strict";

const path = require("path");

const modulesDir = process.argv[2];
if (!modulesDir) {
  console.error("usage: node validate.js NODE_MODULES_DIR < docs.json");
  process.exit(2);
}
const load = (m) => require(path.join(modulesDir, m));

// apiVersion "v1" is the core group; "apps/v1" is group apps, version v1.
function modelClass(apiVersion, kind) {
  let exported;
  try {
    exported = load(`kubernetes-models/${apiVersion}`);
  } catch (e) {
    return null;
  }
  return exported[kind] || null;
}

// Wraps `value` so that every property the validator reads is recorded. The
// compiled validators read each property their schema defines, and enumerate
// the keys of maps (labels, resources); any other key of an object they
// looked into is unknown to the schema.
function track(value, where, records) {
  if (value === null || typeof value !== "object") return value;
  const rec = { where, value, read: new Set(), enumerated: false };
  records.push(rec);
  const children = new Map();
  return new Proxy(value, {
    get(target, key, receiver) {
      const v = Reflect.get(target, key, receiver);
      if (typeof key !== "string" || !Object.prototype.hasOwnProperty.call(target, key)) return v;
      rec.read.add(key);
      if (v === null || typeof v !== "object") return v;
      if (!children.has(key)) children.set(key, track(v, `${where}/${key}`, records));
      return children.get(key);
    },
    ownKeys(target) {
      rec.enumerated = true;
      return Reflect.ownKeys(target);
    },
  });
}

function unknownFields(records) {
  const out = [];
  for (const r of records) {
    if (Array.isArray(r.value) || r.enumerated || r.read.size === 0) continue;
    for (const key of Object.keys(r.value)) {
      if (!r.read.has(key)) out.push(`${r.where || "/"}: unknown field "${key}"`);
    }
  }
  return out;
}

function problems(doc) {
  if (!doc || typeof doc.apiVersion !== "string" || typeof doc.kind !== "string") {
    return ["not a Kubernetes object (apiVersion and kind missing)"];
  }
  const Model = modelClass(doc.apiVersion, doc.kind);
  if (!Model) return [`kubernetes-models has no ${doc.apiVersion} ${doc.kind}`];
  try {
    new Model(doc).validate();
  } catch (e) {
    return [e.message];
  }
  // The schema passed: now look for fields it does not define.
  const records = [];
  const copy = JSON.parse(JSON.stringify(doc));
  Model.prototype.validate.call(track(copy, "", records));
  return unknownFields(records);
}

let input = "";
process.stdin.setEncoding("utf8");
process.stdin.on("data", (chunk) => (input += chunk));
process.stdin.on("end", () => {
  let failed = false;
  for (const { name, doc } of JSON.parse(input)) {
    for (const p of problems(doc)) {
      console.log(`${name}: ${p}`);
      failed = true;
    }
  }
  process.exit(failed ? 1 : 0);
});
