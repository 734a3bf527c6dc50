// Validates a .glb or .gltf file with the Khronos glTF Validator and prints its report as JSON.
// Usage: node tests/gltf_validate.mjs FILE.glb
// The validator is the npm package gltf-validator, installed by `make gltf-validator` into
// .gltf-validator/ at the repository root (or the folder GLTF_VALIDATOR_PREFIX names).
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { basename, dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const file = process.argv[2];
if (!file) {
  console.error("usage: node tests/gltf_validate.mjs FILE.glb");
  process.exit(2);
}
const root = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const prefix = process.env.GLTF_VALIDATOR_PREFIX || join(root, ".gltf-validator");
const validator = createRequire(join(prefix, "package.json"))("gltf-validator");

try {
  const report = await validator.validateBytes(new Uint8Array(readFileSync(file)), {
    uri: basename(file),
    maxIssues: 0, // 0: report every issue, not the first hundred
  });
  console.log(JSON.stringify(report, null, 2));
} catch (error) {
  // Rejected: the bytes are neither glTF nor GLB, or the arguments were wrong.
  console.error(`gltf-validator could not read ${file}: ${error}`);
  process.exit(1);
}
