'use strict';
// producer -> token -> consumer, from Node.js, against a running broker.
//
//   node clients/node/example.js [--home DIR] [--target HOST:PORT] [--key-id ID]
//
// With `make run` going, the defaults find the broker and the development certificates under
// ./var. The admin creates the key (if it does not exist yet) with a policy letting the producer
// encrypt and the consumer decrypt for the cohort; the producer gets a data key bound to the
// context (GenerateDataKey); the consumer asks for a token stating why (IssueToken) and unwraps
// the data key with it (Decrypt). Prints one JSON line and exits 0 when the consumer's key equals
// the producer's, 1 otherwise.

const { connectDev } = require('./keybroker.js');

function parseArgs(argv) {
  const args = { home: process.env.KEYBROKER_HOME || 'var', target: process.env.KEYBROKER_TARGET, keyId: 'node-example' };
  for (let i = 0; i < argv.length; i += 2) {
    const [flag, value] = [argv[i], argv[i + 1]];
    if (value === undefined) throw new Error(`${flag} needs a value`);
    if (flag === '--home') args.home = value;
    else if (flag === '--target') args.target = value;
    else if (flag === '--key-id') args.keyId = value;
    else throw new Error(`unknown option ${flag}`);
  }
  return args;
}

async function main() {
  const { home, target, keyId } = parseArgs(process.argv.slice(2));
  const context = { dataset: 'cohort-42' };
  const admin = connectDev(home, 'admin', target);
  const producer = connectDev(home, 'producer', target);
  const consumer = connectDev(home, 'consumer', target);
  try {
    try {
      await admin.keyAdmin.createKey({
        key_id: keyId,
        description: 'created by the Node.js example',
        policy: {
          grants: [
            { principal: 'producer', operations: ['OPERATION_ENCRYPT'] },
            { principal: 'consumer', operations: ['OPERATION_DECRYPT'], context: { dataset: 'cohort-*' } },
          ],
        },
      });
    } catch (err) {
      if (err.code !== 'ALREADY_EXISTS') throw err;
    }

    // Producer: a fresh data key; encrypt locally with plaintext_key, keep only wrapped_key.
    const dk = await producer.crypto.generateDataKey({ key_id: keyId, context });

    // Consumer: a short-lived token bound to its own certificate, then the data key.
    const issued = await consumer.tokens.issueToken({
      key_id: keyId,
      context,
      justification: 'survival study 42 (Node.js example)',
    });
    const opened = await consumer.crypto.decrypt({ ciphertext: dk.wrapped_key, context, token: issued.token });

    const same = Buffer.compare(opened.plaintext, dk.plaintext_key) === 0;
    console.log(
      JSON.stringify({
        key_id: opened.key_id,
        key_version: opened.key_version,
        token_id: issued.token_id,
        wrapped_key_bytes: dk.wrapped_key.length,
        data_key_matches: same,
      }),
    );
    return same ? 0 : 1;
  } finally {
    for (const c of [admin, producer, consumer]) c.close();
  }
}

main().then(
  (code) => {
    process.exitCode = code;
  },
  (err) => {
    console.error(`keybroker example: ${err.message}`);
    process.exitCode = 1;
  },
);
