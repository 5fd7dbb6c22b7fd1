// node-postgres on the decrypted view (`nodepg_app.js view`): plain SQL on
// nodepg_accounts_decrypted, no pg_kms function in the application's code.
'use strict';
const { check } = require('./common');
const { STORED } = require('./verify');

// recipe: node-pg view
// nodepg_accounts (email, phone protected, context id::text) is read and
// written through the view pg_kms made for it, like a table.
async function addAccount(client, { email, phone = null, name = null }) {
  const { rows } = await client.query(
    'INSERT INTO nodepg_accounts_decrypted (email, phone, name) VALUES ($1, $2, $3) RETURNING id',
    [email, phone, name]);
  return rows[0].id;
}

// Many rows in one statement, still as bind parameters: arrays + unnest.
async function addAccounts(client, accounts) {
  const { rows } = await client.query(`
    INSERT INTO nodepg_accounts_decrypted (email, phone, name)
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[])
    RETURNING id, email`,
  [accounts.map((a) => a.email), accounts.map((a) => a.phone ?? null), accounts.map((a) => a.name ?? null)]);
  return rows;
}

async function findByEmail(client, email) { // index scan on the blind index, then recheck
  const { rows } = await client.query(`
    SELECT id, email, phone, name FROM nodepg_accounts_decrypted
     WHERE email_bidx = kms_blind_index($1, 'pii', NULL, 64) AND email = $1`, [email]);
  return rows[0] || null;
}
// end recipe

async function stored(client) {
  const { rows } = await client.query(STORED('nodepg_accounts'));
  return [Number(rows[0].good), Number(rows[0].total)];
}

async function run(client) {
  await client.query('DELETE FROM nodepg_accounts_decrypted');
  const one = await addAccount(client, { email: 'd1@example.com', phone: '+1 555 1001', name: 'D 1' });
  check(one !== undefined && one !== null, 'insert into the view: identity id read back (RETURNING)');
  const many = await addAccounts(client, Array.from({ length: 9 }, (_, k) => ({
    email: `d${k + 2}@example.com`, phone: `+1 555 10${String(k + 2).padStart(2, '0')}`, name: `D ${k + 2}` })));
  check(many.length === 9 && new Set(many.map((r) => r.id)).size === 9, 'multi-row insert (unnest of bound arrays): 9 ids');
  check(JSON.stringify(await stored(client)) === '[10,10]', 'all 10 rows stored encrypted with their id as context, blind index filled');
  const { rows } = await client.query('SELECT id, email, phone, name FROM nodepg_accounts_decrypted WHERE id = $1', [one]);
  check(rows[0].email === 'd1@example.com' && rows[0].phone === '+1 555 1001', 'select from the view: decrypted');
  const d5 = await findByEmail(client, 'd5@example.com');
  check(d5 !== null && d5.id === many[3].id, 'blind-index lookup on the view');
  const upd = await client.query('UPDATE nodepg_accounts_decrypted SET email = $2 WHERE id = $1', [one, 'one@example.org']);
  check(upd.rowCount === 1 && (await findByEmail(client, 'one@example.org')).id === one &&
        (await findByEmail(client, 'd1@example.com')) === null, 'update re-encrypts and re-indexes (rowCount 1)');
  const del = await client.query('DELETE FROM nodepg_accounts_decrypted WHERE id = $1', [one]);
  check(del.rowCount === 1, 'delete through the view (rowCount 1)');
  check(JSON.stringify(await stored(client)) === '[9,9]', 'after update and delete: 9 rows, all stored right');
}

module.exports = { run };
