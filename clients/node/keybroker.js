'use strict';
// A Node.js client of the keybroker key broker: gRPC over mutual TLS with @grpc/grpc-js.
//
// The services are loaded at run time from the repository's protos/ with @grpc/proto-loader:
// no generated or copied stubs, so the client follows the API contract as it stands. Field names
// are those of the .proto files (key_id, wrapped_key, ...); bytes are Buffers; enums are their
// names ("OPERATION_ENCRYPT"); every call returns a Promise and carries an x-request-id that the
// broker records in the call's audit event.

const crypto = require('node:crypto');
const fs = require('node:fs');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTOS = path.resolve(__dirname, '..', '..', 'protos');
const SERVICES = ['KeyAdmin', 'Crypto', 'Tokens', 'Audit'];
const DEFAULT_TIMEOUT_MS = 10000;

/** Loads keybroker.v1 from protos/ (or another directory holding keybroker/v1/*.proto). */
function loadApi(protoRoot = PROTOS) {
  const dir = path.join(protoRoot, 'keybroker', 'v1');
  const files = fs.readdirSync(dir).filter((f) => f.endsWith('.proto')).map((f) => path.join(dir, f));
  const definition = protoLoader.loadSync(files, {
    includeDirs: [protoRoot],
    keepCase: true,
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).keybroker.v1;
}

/** An error of a failed call: `code` is the gRPC status name, e.g. "PERMISSION_DENIED". */
class KeybrokerError extends Error {
  constructor(code, message, requestId) {
    super(`${code}: ${message}`);
    this.name = 'KeybrokerError';
    this.code = code;
    this.details = message;
    this.requestId = requestId;
  }
}

const STATUS_NAMES = Object.fromEntries(Object.entries(grpc.status).map(([name, n]) => [n, name]));

function promisify(client, method, timeoutMs) {
  return (request = {}) =>
    new Promise((resolve, reject) => {
      const requestId = crypto.randomUUID();
      const metadata = new grpc.Metadata();
      metadata.set('x-request-id', requestId);
      const deadline = new Date(Date.now() + timeoutMs);
      client[method](request, metadata, { deadline }, (err, response) => {
        if (err) {
          reject(new KeybrokerError(STATUS_NAMES[err.code] || 'UNKNOWN', err.details || err.message, requestId));
        } else {
          resolve(response);
        }
      });
    });
}

/**
 * Connects to a broker over mutual TLS.
 *
 * @param {object} options
 * @param {string} options.target  the broker's host:port
 * @param {Buffer} options.ca      PEM of the CA that signed the broker's certificate
 * @param {Buffer} options.cert    PEM of the client certificate (its identity is the principal)
 * @param {Buffer} options.key     PEM of the client key
 * @param {number} [options.timeoutMs]  deadline of each call
 * @returns {{keyAdmin: object, crypto: object, tokens: object, audit: object, close: Function}}
 *   one object per service whose methods are the RPCs in lowerCamelCase (generateDataKey, ...),
 *   each taking the request message and returning a Promise of the response; server-streaming
 *   RPCs (listAuditEvents) return the grpc-js stream.
 */
function connect({ target, ca, cert, key, timeoutMs = DEFAULT_TIMEOUT_MS, protoRoot }) {
  const api = loadApi(protoRoot);
  const credentials = grpc.credentials.createSsl(ca, key, cert);
  const channel = new grpc.Channel(target, credentials, {});
  const result = { close: () => channel.close() };
  for (const name of SERVICES) {
    const Service = api[name];
    const client = new Service(target, credentials, { channelOverride: channel });
    const methods = {};
    for (const [rpc, spec] of Object.entries(Service.service)) {
      const call = rpc.charAt(0).toLowerCase() + rpc.slice(1);
      methods[call] = spec.responseStream
        ? (request = {}) => client[rpc](request, { deadline: new Date(Date.now() + timeoutMs) })
        : promisify(client, rpc, timeoutMs);
    }
    result[name.charAt(0).toLowerCase() + name.slice(1)] = methods;
  }
  return result;
}

/**
 * Connects as a development identity of a broker home (HOME/pki/NAME.pem and NAME.key), the
 * layout `make run` leaves; the target defaults to HOME/listen.addr.
 */
function connectDev(home, identity, target) {
  const pki = path.join(home, 'pki');
  const addr = target || fs.readFileSync(path.join(home, 'listen.addr'), 'utf8').trim();
  return connect({
    // The development server certificate names localhost; connecting by that name gives TLS a
    // proper server name (SNI cannot carry an IP address, and Node warns when asked to).
    target: addr.replace(/^(0\.0\.0\.0|127\.0\.0\.1|\[::\]|):/, 'localhost:'),
    ca: fs.readFileSync(path.join(pki, 'ca.pem')),
    cert: fs.readFileSync(path.join(pki, `${identity}.pem`)),
    key: fs.readFileSync(path.join(pki, `${identity}.key`)),
  });
}

module.exports = { connect, connectDev, loadApi, KeybrokerError, PROTOS };
