// Sequelize 6 (on node-postgres) against pg_kms. Run by
// pgrx_tests/tests/clients.rs as `node sequelize_app.js [explicit] [view]`
// with NODE_PATH pointing at the pinned install; the parts between
// `// recipe:` and `// end recipe` are quoted verbatim in docs/clients.md
// (the test checks that they match).
'use strict';
const { check, done, styles, run } = require('./common');

// recipe: sequelize connection
const { Sequelize } = require('sequelize');

function connect() {
  return new Sequelize({
    dialect: 'postgres',
    host: process.env.PGHOST, // a socket directory works as host
    port: Number(process.env.PGPORT),
    database: process.env.PGDATABASE,
    username: process.env.PGUSER,
    logging: false,
  });
}
// end recipe

// recipe: sequelize explicit
const { DataTypes, QueryTypes, fn, col, cast } = require('sequelize');

// Writes go through sequelize.query() with bind parameters: fn() and
// literal() would put the plaintext into the statement text.
function defineCustomer(sequelize) {
  const decrypted = (c) => [fn('kms_decrypt', col(c), cast(col('id'), 'text')), c];
  return sequelize.define('Customer', {
    id: { type: DataTypes.BIGINT, primaryKey: true, autoIncrement: true },
    email: DataTypes.TEXT, // encrypted_text in the table
    email_bidx: DataTypes.BLOB,
    phone: DataTypes.TEXT, // encrypted_text in the table
    name: DataTypes.TEXT,
  }, {
    tableName: 'sequelize_customers',
    timestamps: false,
    defaultScope: { attributes: ['id', decrypted('email'), decrypted('phone'), 'name'] },
  });
}

// The id comes from the identity's sequence first, so that it can be the
// context of the row's values.
const INSERT = `
  INSERT INTO sequelize_customers (id, email, email_bidx, phone, name)
  SELECT n, kms_encrypt($email, 'pii', n::text), kms_blind_index($email, 'pii', NULL, 64),
         kms_encrypt($phone, 'pii', n::text), $name
    FROM (SELECT nextval(pg_get_serial_sequence('sequelize_customers', 'id')) AS n) s
  RETURNING id`;

async function addCustomer(sequelize, { email, phone = null, name = null }) {
  const [row] = await sequelize.query(INSERT, { bind: { email, phone, name }, type: QueryTypes.SELECT });
  return row.id;
}

async function findByEmail(Customer, email) {
  const rows = await Customer.sequelize.query(`
    SELECT id, kms_decrypt(email, id::text) AS email, kms_decrypt(phone, id::text) AS phone, name
      FROM sequelize_customers
     WHERE email_bidx = kms_blind_index($email, 'pii', NULL, 64)  -- index scan
       AND kms_decrypt(email, id::text) = $email                  -- recheck`,
  { bind: { email }, model: Customer, mapToModel: true });
  return rows[0] || null;
}

async function updateEmail(sequelize, id, email) {
  await sequelize.query(`
    UPDATE sequelize_customers
       SET email = kms_encrypt($email, 'pii', id::text), email_bidx = kms_blind_index($email, 'pii', NULL, 64)
     WHERE id = $id`, { bind: { id, email } });
}
// end recipe

async function explicit(sequelize) {
  const Customer = defineCustomer(sequelize);
  await Customer.destroy({ where: {} });
  const ids = [];
  for (let i = 1; i <= 10; i += 1) {
    ids.push(await addCustomer(sequelize, { email: `user${i}@example.com`, phone: `+1 555 05${String(i).padStart(2, '0')}`, name: `User ${i}` }));
  }
  check(new Set(ids).size === 10, 'insert via sequelize.query with bind: 10 rows, identity ids returned');
  const all = await Customer.findAll({ order: [['id', 'ASC']] });
  check(JSON.stringify(all.map((c) => [c.email, c.phone, c.name])) ===
        JSON.stringify(Array.from({ length: 10 }, (_, k) => [`user${k + 1}@example.com`, `+1 555 05${String(k + 1).padStart(2, '0')}`, `User ${k + 1}`])),
        'findAll (default scope) decrypts with the row id as context');
  const c3 = await findByEmail(Customer, 'user3@example.com');
  check(c3 !== null && String(c3.id) === String(ids[2]) && c3.name === 'User 3', 'blind-index lookup returns a model instance');
  check((await findByEmail(Customer, 'nobody@example.com')) === null, 'lookup of an unknown value finds nothing');
  await updateEmail(sequelize, ids[2], 'three@example.org');
  check(String((await findByEmail(Customer, 'three@example.org')).id) === String(ids[2]) &&
        (await findByEmail(Customer, 'user3@example.com')) === null, 'update: new value found, old not');
  await Customer.destroy({ where: { id: ids[2] } });
  check((await Customer.count()) === 9, 'destroy');
  const one = await Customer.findByPk(ids[0]);
  check(one.email === 'user1@example.com', 'findByPk decrypts');
}

run(async () => {
  const sequelize = connect();
  try {
    for (const style of styles()) {
      if (style === 'explicit') await explicit(sequelize);
      else if (style === 'view') await require('./sequelize_view').run(sequelize);
      else throw new Error(`unknown style ${style}`);
    }
  } finally {
    await sequelize.close();
  }
  done(`Sequelize ${require('sequelize/package.json').version}`);
});
