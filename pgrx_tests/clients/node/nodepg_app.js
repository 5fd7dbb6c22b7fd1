// node-postgres (pg) against pg_kms. Run by pgrx_tests/tests/clients.rs as
// `node nodepg_app.js [explicit] [view]` with NODE_PATH pointing at the
// pinned install; the parts between `// recipe:` and `// end recipe` are
// quoted verbatim in docs/clients.md (the test checks that they match).
'use strict';
const { check, sqlstateOf, done, styles, run } = require('./common');

// recipe: node-pg explicit
const { Client } = require('pg');

// node-pg sends parameters untyped: give $1 one type everywhere it is used
// ($1::bigint, $1::bigint::text), or PostgreSQL deduces two and fails (42P08).
const INSERT = `
  INSERT INTO nodepg_customers (id, email, email_bidx, phone, name)
  VALUES ($1::bigint, kms_encrypt($2, 'pii', $1::bigint::text),
          kms_blind_index($2, 'pii', NULL, 64),
          kms_encrypt($3, 'pii', $1::bigint::text), $4)`;

const SELECT = `
  SELECT id, kms_decrypt(email, id::text) AS email,
         kms_decrypt(phone, id::text) AS phone, name
    FROM nodepg_customers`;

const FIND_BY_EMAIL = `${SELECT}
   WHERE email_bidx = kms_blind_index($1, 'pii', NULL, 64)  -- index scan
     AND kms_decrypt(email, id::text) = $1                  -- recheck`;

const UPDATE_EMAIL = `
  UPDATE nodepg_customers
     SET email = kms_encrypt($2, 'pii', id::text),
         email_bidx = kms_blind_index($2, 'pii', NULL, 64)
   WHERE id = $1`;

async function findByEmail(client, email) {
  const { rows } = await client.query(FIND_BY_EMAIL, [email]);
  return rows[0] || null;
}
// end recipe

// The README's recipe before the fix: $1 is both the bigint id and the text
// context, which PostgreSQL refuses for an untyped parameter.
const OLD_INSERT = `
  INSERT INTO nodepg_customers (id, email, email_bidx)
  VALUES ($1, kms_encrypt($2, 'pii', $1::text), kms_blind_index($2, 'pii', NULL, 64))`;

const people = Array.from({ length: 10 }, (_, k) => {
  const i = k + 1;
  return { id: i, email: `user${i}@example.com`, phone: `+1 555 04${String(i).padStart(2, '0')}`, name: `User ${i}` };
});

async function explicit(client) {
  await client.query('DELETE FROM nodepg_customers');
  for (const p of people) {
    await client.query(INSERT, [p.id, p.email, p.phone, p.name]);
  }
  const { rows } = await client.query(`${SELECT} ORDER BY id`);
  check(JSON.stringify(rows.map((r) => [Number(r.id), r.email, r.phone, r.name])) ===
        JSON.stringify(people.map((p) => [p.id, p.email, p.phone, p.name])),
        'insert with $1::bigint (10 rows), select decrypted');
  const state = await sqlstateOf(client.query(OLD_INSERT, [11, 'old@example.com']));
  check(state === '42P08', `the old recipe ($1 and $1::text) still fails with 42P08 on node-pg (got ${state})`);
  const prepared = await sqlstateOf(client.query({ name: 'insert_customer', text: INSERT, values: [12, 'p@example.com', null, null] }));
  check(prepared === 'ok', 'the fixed recipe also works as a named prepared statement');
  const r7 = await findByEmail(client, 'user7@example.com');
  check(r7 !== null && Number(r7.id) === 7 && r7.name === 'User 7', 'blind-index lookup finds id 7');
  check((await findByEmail(client, 'nobody@example.com')) === null, 'lookup of an unknown value finds nothing');
  await client.query(UPDATE_EMAIL, [7, 'seven@example.org']);
  check(Number((await findByEmail(client, 'seven@example.org')).id) === 7 &&
        (await findByEmail(client, 'user7@example.com')) === null, 'update: new value found, old not');
  await client.query('DELETE FROM nodepg_customers WHERE id = $1', [7]);
  check((await findByEmail(client, 'seven@example.org')) === null, 'delete');
  const moved = await sqlstateOf(client.query("SELECT kms_decrypt(email, '2') FROM nodepg_customers WHERE id = 1"));
  check(moved === '39000', `a value read with another row's context fails (${moved})`);
  const raw = await client.query('SELECT email FROM nodepg_customers WHERE id = 1');
  check(typeof raw.rows[0].email === 'string' && raw.rows[0].email.startsWith('kms:'), 'encrypted_text arrives as kms:... text');
}

run(async () => {
  const client = new Client(); // PGHOST, PGPORT, PGUSER, PGDATABASE
  await client.connect();
  try {
    for (const style of styles()) {
      if (style === 'explicit') await explicit(client);
      else if (style === 'view') await require('./nodepg_view').run(client);
      else throw new Error(`unknown style ${style}`);
    }
  } finally {
    await client.end();
  }
  done(`node-postgres ${require('pg/package.json').version}`);
});
