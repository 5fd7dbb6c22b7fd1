// Sequelize 6 on the decrypted view (`sequelize_app.js view`): a plain model
// of sequelize_accounts_decrypted.
//
// Sequelize 6 binds the values of create() and save() as parameters, but
// writes those of bulkCreate() and of `where` into the statement text as
// escaped literals. Those values here are marked `@inline.test` (not the
// test's plaintext marks), and pgrx_tests/tests/clients.rs checks that they
// do reach the server log: the limitation docs/clients.md states.
'use strict';
const { check } = require('./common');
const { STORED } = require('./verify');

// recipe: sequelize view
const { DataTypes: T } = require('sequelize');

function defineAccount(sequelize) {
  return sequelize.define('Account', {
    id: { type: T.BIGINT, primaryKey: true, autoIncrement: true },
    email: { type: T.TEXT, allowNull: false },
    phone: T.TEXT,
    name: T.TEXT,
  }, { tableName: 'sequelize_accounts_decrypted', timestamps: false }); // the view pg_kms made
}

// Indexed: the blind index, then the recheck; bound, not inlined by `where`.
async function findByEmail(Account, email) {
  const rows = await Account.sequelize.query(`
    SELECT id, email, phone, name FROM sequelize_accounts_decrypted
     WHERE email_bidx = kms_blind_index($email, 'pii', NULL, 64) AND email = $email`,
  { bind: { email }, model: Account, mapToModel: true });
  return rows[0] || null;
}
// end recipe

async function stored(sequelize) {
  const [rows] = await sequelize.query(STORED('sequelize_accounts'));
  return [Number(rows[0].good), Number(rows[0].total)];
}

async function run(sequelize) {
  const Account = defineAccount(sequelize);
  await Account.destroy({ where: {} });
  const a = await Account.create({ email: 'e1@example.com', phone: '+1 555 1101', name: 'E 1' });
  check(a.id !== null && a.id !== undefined && a.email === 'e1@example.com', 'create: identity id and values read back (RETURNING)');
  const made = await Account.bulkCreate(
    Array.from({ length: 9 }, (_, k) => ({ email: `e${k + 2}@inline.test`, name: `E ${k + 2}` })), { returning: true });
  check(made.length === 9 && new Set(made.map((m) => String(m.id))).size === 9, 'bulkCreate (returning): 9 rows, 9 ids');
  check(JSON.stringify(await stored(sequelize)) === '[10,10]', 'all 10 rows stored encrypted with their id as context, blind index filled');
  const all = await Account.findAll({ order: [['id', 'ASC']] });
  check(all.length === 10 && all[0].email === 'e1@example.com' && all[0].phone === '+1 555 1101' && all[1].email === 'e2@inline.test',
        'findAll: decrypted, in id order');
  const e5 = await Account.findOne({ where: { email: 'e5@inline.test' } });
  check(e5 !== null && String(e5.id) === String(made[3].id), 'findOne({ where: { email } }): found (a scan of the view)');
  const e6 = await findByEmail(Account, 'e6@inline.test');
  check(e6 !== null && String(e6.id) === String(made[4].id) && e6.name === 'E 6', 'indexed lookup (blind index, then recheck)');
  check((await findByEmail(Account, 'nobody@example.com')) === null, 'indexed lookup of an unknown value finds nothing');
  a.email = 'one@example.org';
  a.phone = null;
  await a.save();
  const again = await Account.findByPk(a.id);
  check(again.email === 'one@example.org' && again.phone === null, 'save() of changed values (UPDATE by primary key)');
  await again.destroy();
  check((await Account.findByPk(a.id)) === null && (await Account.count()) === 9, 'destroy');
  check(JSON.stringify(await stored(sequelize)) === '[9,9]', 'after update and delete: 9 rows, all stored right');
}

module.exports = { run };
