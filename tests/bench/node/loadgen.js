// A gRPC load generator over mTLS on @grpc/grpc-js: C channels (each its own connection), N
// unary calls kept in flight, pre-serialised request bytes (identity serialisers, no generated
// code).
//
// Usage: node loadgen.js TARGET CA CERT KEY METHOD PAYLOAD_HEX INFLIGHT CHANNELS
// Protocol (shared with the Python and C++ generators, see tests/bench/gen.py): warms up,
// prints "ready", reads "T0 T1" (CLOCK_MONOTONIC nanoseconds) from stdin, counts the calls
// that complete inside [T0, T1], stops issuing at T1, drains and prints one JSON line.
'use strict';

const fs = require('node:fs');
const readline = require('node:readline');
const grpc = require('@grpc/grpc-js');

const [target, ca, cert, key, method, payloadHex, inflightArg, channelsArg] =
  process.argv.slice(2);
const inflight = Number(inflightArg);
// "@PATH": the raw request bytes in a file (a batch request is too long for argv).
const payload = payloadHex.startsWith('@')
  ? fs.readFileSync(payloadHex.slice(1))
  : Buffer.from(payloadHex, 'hex');
const identity = (x) => x;
const creds = grpc.credentials.createSsl(
  fs.readFileSync(ca),
  fs.readFileSync(key),
  fs.readFileSync(cert),
);
// A local subchannel pool per client: otherwise clients to one target share a connection, and
// SO_REUSEPORT spreads connections, not calls, over a server's processes.
const clients = Array.from(
  { length: Math.max(1, Number(channelsArg)) },
  () => new grpc.Client(target, creds, { 'grpc.use_local_subchannel_pool': 1 }),
);

const NEVER = 2n ** 63n;
let t0 = NEVER;
let t1 = NEVER;
let active = inflight;
let warm = 0;
let ready = false;
let ok = 0;
let errors = 0;
let firstError = '';
const latUs = [];
const warmNeeded = Math.max(20, 2 * inflight);

function finish() {
  process.stdout.write(
    JSON.stringify({ ok, errors, error: firstError, lat_us: latUs }) + '\n',
    () => process.exit(0),
  );
}

function one(slot) {
  const start = process.hrtime.bigint();
  const options = { deadline: Date.now() + 30000 };
  clients[slot % clients.length].makeUnaryRequest(method, identity, identity, payload, options, (err) => {
    const end = process.hrtime.bigint();
    if (end >= t0 && end <= t1) {
      if (err) {
        errors += 1;
        if (!firstError) firstError = err.details || String(err);
      } else {
        ok += 1;
        latUs.push(Number((end - start) / 1000n));
      }
    } else if (!ready) {
      if (err && !firstError) firstError = err.details || String(err);
      warm += 1;
      if (warm >= warmNeeded) {
        ready = true;
        process.stdout.write('ready\n');
      }
    }
    if (end < t1) {
      one(slot);
    } else {
      active -= 1;
      if (active === 0) finish();
    }
  });
}

readline.createInterface({ input: process.stdin }).once('line', (line) => {
  const [a, b] = line.trim().split(/\s+/).map(BigInt);
  t1 = b;
  t0 = a;
});

for (let i = 0; i < inflight; i += 1) one(i);
