// Writes the licences of every npm package whose code esbuild put into the bundles (from its metafiles):
//   node licenses.js OUT_FILE META.json...
const fs = require("fs");
const path = require("path");
const [out, ...metas] = process.argv.slice(2);
const roots = new Set();
for (const meta of metas) {
  for (const input of Object.keys(JSON.parse(fs.readFileSync(meta, "utf8")).inputs)) {
    const m = input.match(/^(.*node_modules\/(?:@[^/]+\/)?[^/]+)\//);
    if (m) roots.add(m[1]);
  }
}
const parts = [];
for (const root of [...roots].sort()) {
  const pkg = JSON.parse(fs.readFileSync(path.join(root, "package.json"), "utf8"));
  const file = fs.readdirSync(root).find((f) => /^(licen[cs]e|copying)/i.test(f));
  const text = file ? fs.readFileSync(path.join(root, file), "utf8").trim() : "(the package ships no licence file)";
  parts.push(`${pkg.name} ${pkg.version}: ${pkg.license || "see below"}\n\n${text}\n`);
}
fs.writeFileSync(out, parts.join(`\n${"-".repeat(72)}\n\n`));
